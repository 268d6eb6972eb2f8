"""Errors raised while resolving or loading a model; messages are one user-facing line."""

from __future__ import annotations


class ModelNotAvailableError(ValueError):
    """The named model cannot be loaded here (unknown, not downloaded while offline, broken)."""
