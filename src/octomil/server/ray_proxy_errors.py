"""Ray Serve proxy errors in the OpenAI shape.

When a replica dies with a request in flight, Ray's HTTP proxy returns without answering (uvicorn
then sends a ``text/plain`` "Internal Server Error"); for a timeout or a full queue it answers
itself in plain text. Clients of this server parse
``{"error": {...}}``; this middleware, installed in Ray's proxy through
``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` (``octomil serve --ray`` sets it for the local
cluster it starts), rewrites such answers — an error status on a response that no replica
produced, i.e. without ``X-Octomil-Replica``, or no answer at all (500) — into that shape,
keeping the status code.
"""

from __future__ import annotations

from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from octomil.server.errors import APIError, error_response
from octomil.server.replica_header import HEADER_REPLICA

IMPORT_PATH = "octomil.server.ray_proxy_errors.proxy_middlewares"
_REPLICA = HEADER_REPLICA.lower().encode()

_MESSAGES = {
    500: "the replica serving this request failed before it finished; retry the request",
    503: "no replica is available to serve this request; retry later",
    504: "the request timed out in the Ray Serve proxy",
}


class ProxyErrorMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        replaced: int | None = None  # status of the proxy's own error being swallowed
        started = False

        async def answer(status: int) -> None:
            text = _MESSAGES.get(status, f"the Ray Serve proxy answered {status}")
            await error_response(APIError(status, text, code="proxy_error"))(scope, receive, send)

        async def send_wrapper(message: Message) -> None:
            nonlocal replaced, started
            if message["type"] == "http.response.start":
                started = True
                names = {name.lower() for name, _ in message.get("headers", ())}
                if message["status"] >= 400 and _REPLICA not in names:
                    replaced = message["status"]
                    return
            elif replaced is not None and message["type"] == "http.response.body":
                if not message.get("more_body", False):
                    await answer(replaced)
                return
            await send(message)

        await self.app(scope, receive, send_wrapper)
        if not started:
            # The replica died with the request: the proxy returns without answering, and
            # uvicorn would send its own plain-text 500.
            await answer(500)


def proxy_middlewares() -> list[Middleware]:
    """The callback Ray's proxy calls (by import path) for middlewares to wrap itself with."""
    return [Middleware(ProxyErrorMiddleware)]
