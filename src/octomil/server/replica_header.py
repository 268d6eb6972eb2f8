"""``X-Octomil-Replica``: every response names the server replica that produced it.

Behind a load balancer (Ray Serve's proxy, a Kubernetes Service) a client sees one endpoint;
this header tells which replica answered, for debugging and for tests that check the spread.
Pure ASGI and added outermost, so it stamps every status, including 401/413 from inner
middleware and error events of streams (the header goes out with the response start).
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER_REPLICA = "X-Octomil-Replica"


class ReplicaHeaderMiddleware:
    def __init__(self, app: ASGIApp, replica: str) -> None:
        self.app = app
        self.header = (HEADER_REPLICA.lower().encode(), replica.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), self.header]}
            await send(message)

        await self.app(scope, receive, send_wrapper)
