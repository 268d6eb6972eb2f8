"""Server-sent events in OpenAI's framing: ``data: {json}`` per chunk, then ``data: [DONE]``.

A failure after the stream started cannot change the status code any more, so it is sent as one
``data: {"error": {...}}`` event before ``[DONE]`` (as vLLM does). When the client disconnects,
sse-starlette cancels the producer; ``on_close`` then cancels the generation.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from sse_starlette.sse import EventSourceResponse

from octomil.config import ConfigError
from octomil.engine.errors import EngineInputError
from octomil.engine.types import TokenEvent
from octomil.server.engine_client import EngineStoppedError, GenerationAbortedError
from octomil.server.errors import APIError, error_body

logger = logging.getLogger("octomil.server")

DONE = "[DONE]"


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def _error_event(exc: BaseException) -> str:
    if isinstance(exc, APIError):
        return _dumps(error_body(exc.message, exc.type, exc.param, exc.code))
    if isinstance(exc, (GenerationAbortedError, EngineStoppedError)):
        return _dumps(error_body(str(exc), "service_unavailable", None, "shutting_down"))
    if isinstance(exc, (EngineInputError, ConfigError)):
        code = getattr(exc, "code", None)
        return _dumps(error_body(str(exc), "invalid_request_error", exc.param, code))
    logger.exception("stream failed", exc_info=exc)
    return _dumps(error_body(f"internal error: {type(exc).__name__}", "internal_server_error"))


async def _frames(
    chunks: AsyncIterator[dict[str, Any]], on_close: Callable[[], None] | None
) -> AsyncIterator[dict[str, str]]:
    try:
        async for chunk in chunks:
            yield {"data": _dumps(chunk)}
    except Exception as exc:  # noqa: BLE001 - reported in-band, the status line is gone
        yield {"data": _error_event(exc)}
    finally:
        if on_close is not None:
            on_close()
    yield {"data": DONE}


async def completion_chunks(
    events: AsyncIterator[TokenEvent],
    envelope: dict[str, Any],
    choice: Callable[[TokenEvent], dict[str, Any]],
    *,
    final_extras: Callable[[], dict[str, Any]],
    usage: Callable[[], dict[str, Any]] | None,
    first_choice: dict[str, Any] | None = None,
) -> AsyncIterator[dict[str, Any]]:
    """OpenAI streaming chunks (chat or text completion, by ``envelope`` and ``choice``).

    One chunk per token that brings text or a logprob, the last one (with ``finish_reason``) also
    carrying ``final_extras()``; then, when ``usage`` is given, a chunk with no choices and usage.
    """
    if first_choice is not None:
        yield {**envelope, "choices": [first_choice]}
    try:
        async for event in events:
            final = event.finish_reason is not None
            if not final and not event.text and event.logprob is None:
                continue  # e.g. text held back while a stop string may still match
            body = choice(event)
            if not final and body.get("delta") == {} and body.get("logprobs") is None:
                continue  # nothing to send yet (e.g. a tool call still being written)
            chunk = {**envelope, "choices": [body]}
            if final:
                chunk.update(final_extras())
            yield chunk
    except GenerationAbortedError:
        # Ended by the server (shutdown deadline): close the choice, then report the error.
        yield {**envelope, "choices": [choice(_ABORTED)]}
        raise
    if usage is not None:
        yield {**envelope, "choices": [], "usage": usage()}


# The last event of a generation the server ended before it finished.
_ABORTED = TokenEvent(
    token_id=-1, text="", layers_used=0, entropy=None, exited_early=False, finish_reason="abort"
)


def response(
    chunks: AsyncIterator[dict[str, Any]],
    *,
    on_close: Callable[[], None] | None = None,
    headers: dict[str, str] | None = None,
) -> EventSourceResponse:
    return EventSourceResponse(
        _frames(chunks, on_close),
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})},
        sep="\n",
        ping=15,
    )
