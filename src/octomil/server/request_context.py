"""Request ids and structured logs: every response and every log line names its request.

:class:`RequestIdMiddleware` (outermost) takes the client's ``X-Request-Id`` when it is a short
printable token, or makes one, keeps it in a context variable for the request's task (so any log
line written while serving it carries it, uvicorn's access line included) and returns it in the
``X-Request-Id`` response header. :func:`log_config` builds uvicorn's logging configuration with
that id in every line, as text or as one JSON object per line (``--log-format json``).
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import time
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = b"x-request-id"
LOG_FORMATS = ("text", "json")
_VALID = re.compile(rb"^[A-Za-z0-9._:/+=-]{1,128}$")

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


def new_request_id() -> str:
    return "req-" + uuid.uuid4().hex[:24]


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope.get("headers", ())).get(HEADER, b"")
        rid = given.decode() if _VALID.match(given) else new_request_id()
        token = request_id.set(rid)
        scope.setdefault("state", {})["request_id"] = rid

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() != HEADER]
                message = {**message, "headers": [*headers, (HEADER, rid.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            request_id.reset(token)


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        return True


# LogRecord attributes that are not extras a caller passed.
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "color_message"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, request id, message and any extras."""

    def format(self, record: logging.LogRecord) -> str:
        body: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "request_id": getattr(record, "request_id", "-"),
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key != "request_id" and not key.startswith("_"):
                body[key] = value if isinstance(value, str | int | float | bool) else str(value)
        if record.exc_info:
            body["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(body, ensure_ascii=False)


def log_config(log_format: str, level: str) -> dict[str, Any]:
    """uvicorn ``log_config``: its loggers and ``octomil.*`` through one handler on stderr."""
    text = "%(levelname)s:     [%(request_id)s] %(name)s: %(message)s"
    formatter: dict[str, Any] = {"()": JsonFormatter} if log_format == "json" else {"format": text}
    level = level.upper() if level != "trace" else "DEBUG"
    handler = {
        "class": "logging.StreamHandler",
        "stream": "ext://sys.stderr",
        "formatter": "main",
        "filters": ["request_id"],
    }
    loggers = {
        name: {"handlers": ["main"], "level": level, "propagate": False}
        for name in ("uvicorn", "uvicorn.access", "octomil")
    }
    loggers["uvicorn.error"] = {"level": level}  # propagates to "uvicorn"
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"request_id": {"()": RequestIdFilter}},
        "formatters": {"main": formatter},
        "handlers": {"main": handler},
        "loggers": loggers,
    }
