"""Errors the engine raises for bad input; callers map them to their own shape (e.g. HTTP 4xx)."""

from __future__ import annotations


class EngineInputError(ValueError):
    """The request cannot be served as given. ``param`` names the offending field."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


class PromptTooLongError(EngineInputError):
    """Prompt (plus requested tokens) does not fit the model's context window."""

    def __init__(self, message: str, param: str | None = "messages") -> None:
        super().__init__(message, param=param, code="context_length_exceeded")
