"""The one error shape of the HTTP API, and the one place that produces it.

Every failure a client can see is ``{"error": {"message", "type", "param", "code"}}`` (OpenAI's
shape). Routes raise :class:`APIError` (or let engine/config errors propagate); the handlers
installed by :func:`install_error_handlers` turn them, FastAPI validation errors, unknown routes
and unexpected exceptions into that shape. Middleware that answers before routing (API key, body
size) builds its response with :func:`error_response` too.
"""

from __future__ import annotations

import logging
import re
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from octomil.config import ConfigError
from octomil.engine.errors import EngineInputError
from octomil.server.engine_client import EngineStoppedError

logger = logging.getLogger("octomil.server")

# OpenAI's error "type" per status code.
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_server_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """An error answered to the client as-is, in the OpenAI shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "invalid_request_error")
        self.headers = headers


def _printable(text: str | None) -> str | None:
    """Escape lone surrogates (a client's JSON key or value can carry them into a message):
    a response body must be valid UTF-8, or the server would fail while answering."""
    if text is None:
        return None
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_body(
    message: str, type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {
        "error": {
            "message": _printable(message),
            "type": type,
            "param": _printable(param),
            "code": code,
        }
    }


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(
        error_body(err.message, err.type, err.param, err.code),
        status_code=err.status,
        headers=err.headers,
    )


_TYPE_TAG = re.compile(r"[\[\]-]|^[A-Z]")
_BUILTIN_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _loc_to_param(loc: tuple[Any, ...]) -> str | None:
    """``("body", "messages", 0, "role")`` -> ``"messages.0.role"``."""
    parts = [str(p) for p in loc if p != "body"]
    # Union members show up in the location ("bool", "list[int]", "EarlyExitOverride"):
    # not field names, so not useful to a client.
    parts = [p for p in parts if not (_TYPE_TAG.search(p) or p in _BUILTIN_TAGS)]
    return ".".join(parts) or None


def validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    if not errors:
        return APIError(400, "invalid request")
    # With unions pydantic reports one error per member: the deepest location is the
    # member the client meant (e.g. early_exit.threshold rather than "not a boolean"); at equal
    # depth, a failed check of the right type (a lone surrogate in a list of strings) rather
    # than "not an integer".
    first = max(
        errors,
        key=lambda e: (len(e.get("loc", ())), not str(e.get("type", "")).endswith("_type")),
    )
    if first.get("type") == "json_invalid":
        return APIError(400, f"malformed JSON body: {first.get('msg')}", code="invalid_json")
    kind = first.get("type")
    param = _loc_to_param(tuple(first.get("loc", ())))
    msg = str(first.get("msg", "invalid value"))
    if kind == "extra_forbidden":
        # The unknown key itself is kept whatever its spelling (it is not a union tag).
        *where, key = first.get("loc", ("",))
        param = ".".join(filter(None, (_loc_to_param(tuple(where)), str(key))))
        return APIError(
            400, f"unrecognized request argument: {param!r}", param=param, code="unknown_parameter"
        )
    if kind == "unsupported_parameter":  # the message names the field and says why
        return APIError(400, msg, param=param, code="unsupported_parameter")
    if kind == "missing":
        msg = f"missing required parameter {param!r}" if param else "request body is required"
    elif param:
        msg = f"invalid value for {param!r}: {msg}"
    return APIError(400, msg, param=param, code="invalid_value")


def install_error_handlers(app: FastAPI) -> None:
    """Map every exception that can reach the client to the OpenAI error shape."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(exc))

    @app.exception_handler(EngineInputError)
    async def _engine_input(_: Request, exc: EngineInputError) -> JSONResponse:
        return error_response(APIError(400, str(exc), param=exc.param, code=exc.code))

    @app.exception_handler(ConfigError)
    async def _config(_: Request, exc: ConfigError) -> JSONResponse:
        param = f"early_exit.{exc.param}" if exc.param else "early_exit"
        return error_response(APIError(400, str(exc), param=param, code="invalid_value"))

    @app.exception_handler(EngineStoppedError)
    async def _stopped(_: Request, exc: EngineStoppedError) -> JSONResponse:
        return error_response(APIError(503, str(exc), code="shutting_down"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = exc.status_code
        detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(status).phrase
        if status == 404:
            detail = "not found: no such endpoint (see /docs)"
        return error_response(APIError(status, detail, headers=getattr(exc, "headers", None)))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        # A bug on our side, never the client's input: log it with its traceback.
        logger.exception("unhandled error while serving a request")
        return error_response(APIError(500, f"internal error: {type(exc).__name__}"))
