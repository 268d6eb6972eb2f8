"""Graceful shutdown: on SIGTERM/SIGINT stop admitting, let requests finish, end the rest cleanly.

uvicorn's own shutdown closes the listeners and then waits for open connections, cancelling them
after its grace period, which cut streams with no ``[DONE]``. Before that, this server drains the
engine client: new requests get 503, requests in flight may finish within ``--shutdown-timeout``
seconds, and the rest are ended by the engine with an error event and ``finish_reason: "abort"``,
so every stream closes properly and the process exits 0.
"""

from __future__ import annotations

import asyncio

import uvicorn

from octomil.server.engine_client import EngineClient


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, client: EngineClient, timeout: float) -> None:
        super().__init__(config)
        self._client = client
        self._timeout = timeout

    async def shutdown(self, sockets: list | None = None) -> None:  # type: ignore[override]
        for server in self.servers:
            server.close()  # no new connections while draining
        await asyncio.to_thread(self._client.drain, self._timeout)
        await super().shutdown(sockets)
