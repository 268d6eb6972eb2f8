"""Pure ASGI middleware: request counting and the body size limit (413); keys: ``access``.

Pure ASGI (not ``BaseHTTPMiddleware``) so streaming responses and disconnects pass straight through.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from octomil.server.errors import APIError, error_response

# Bounded label values for octomil_requests_total{endpoint=...}.
ENDPOINTS = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/models",
    "/v1/early-exit/stats",
    "/health",
    "/metrics",
    "/admin/early-exit",
)


def endpoint_label(path: str) -> str:
    if path in ENDPOINTS:
        return path
    return "/v1/models/{model}" if path.startswith("/v1/models/") else "other"


class RequestMetricsMiddleware:
    """Counts every response by endpoint and status (including 401/413 from inner middleware)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            serving = getattr(scope["app"].state, "serving", None) if "app" in scope else None
            if serving is not None:
                path = scope.get("path", "")
                serving.metrics.record_request(endpoint_label(path), status)


class BodyLimitMiddleware:
    """Reads the request body up front and answers 413 beyond ``max_bytes``."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        too_large = APIError(
            413,
            f"request body too large (limit {self.max_bytes} bytes)",
            code="request_too_large",
        )
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > self.max_bytes:
                    await error_response(too_large)(scope, receive, send)
                    return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_bytes:
                await error_response(too_large)(scope, receive, send)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # afterwards: wait for http.disconnect

        await self.app(scope, replay, send)
