"""Graceful shutdown: on SIGTERM/SIGINT stop admitting, let requests finish, end the rest cleanly.

uvicorn's own shutdown closes the listeners and then waits for open connections, cancelling them
after its grace period, which cut streams with no ``[DONE]``. Before that, this server drains the
engine client: new requests get 503, requests in flight may finish within ``--shutdown-timeout``
seconds, and the rest are ended by the engine with an error event and ``finish_reason: "abort"``,
so every stream closes properly and the process exits 0.
"""

from __future__ import annotations

import asyncio
from types import FrameType

import uvicorn
from sse_starlette.sse import AppStatus

from octomil.server.engine_client import EngineClient


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, client: EngineClient, timeout: float) -> None:
        super().__init__(config)
        self._client = client
        self._timeout = timeout
        # sse-starlette would end every stream at the signal itself (no [DONE]); the drain ends
        # them instead, and releases whatever is left once it is done.
        AppStatus.disable_automatic_graceful_drain()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        # uvicorn re-raises the signal after shutting down (exit status -15); a completed drain
        # is a clean exit.
        self._captured_signals.clear()

    async def shutdown(self, sockets: list | None = None) -> None:  # type: ignore[override]
        for server in self.servers:
            server.close()  # no new connections while draining
        await asyncio.to_thread(self._client.drain, self._timeout)
        AppStatus.should_exit = True
        await super().shutdown(sockets)
