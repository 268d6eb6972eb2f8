"""``n`` > 1: several choices of one request, each its own generation on the shared scheduler.

The prompt is tokenized once; each choice takes an admission slot and is decoded beside the
others by continuous batching. With a ``seed``, choice ``i`` samples with ``seed + i`` so the
choices differ and the request stays reproducible. Usage adds the choices' tokens up (OpenAI's
rule); the early-exit figures cover all choices.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, fields, replace
from typing import Any

from sse_starlette.sse import EventSourceResponse

from octomil.engine.types import GenerationRequest, GenerationStats, SamplingParams, TokenEvent
from octomil.server import serving, sse, telemetry
from octomil.server.engine_client import GenerationStream, Slot


@dataclass(frozen=True)
class IndexedEvent(TokenEvent):
    """A token event of choice ``index``."""

    index: int = 0


def seeded(params: SamplingParams, index: int) -> SamplingParams:
    if params.seed is None or index == 0:
        return params
    return replace(params, seed=(params.seed + index) % 2**64)


async def start(
    state: serving.ServingState, requests: list[GenerationRequest], slots: list[Slot]
) -> list[GenerationStream]:
    """Submit every choice; if one is refused, the ones already running are cancelled."""
    streams: list[GenerationStream] = []
    try:
        for request, slot in zip(requests, slots, strict=True):
            streams.append(await serving.start(state, request, slot))
    except BaseException:
        for stream in streams:
            stream.cancel()
        raise
    return streams


def admit(state: serving.ServingState, n: int, stack: contextlib.ExitStack) -> list[Slot]:
    return [stack.enter_context(serving.admit(state)) for _ in range(n)]


def merged_stats(all_stats: list[GenerationStats]) -> GenerationStats:
    if len(all_stats) == 1:
        return all_stats[0]
    out = GenerationStats(total_layers=all_stats[0].total_layers)
    for s in all_stats:
        out.completion_tokens += s.completion_tokens
        out.early_exit_tokens += s.early_exit_tokens
        out.forced_tokens += s.forced_tokens
        out.layers_used += s.layers_used
        out.entropies += s.entropies
    return out


async def _merged(
    state: serving.ServingState, streams: list[GenerationStream], arrival: float, prompt: int
) -> AsyncIterator[IndexedEvent]:
    """Every choice's events, as they come."""
    queue: asyncio.Queue[tuple[int, TokenEvent | BaseException | None]] = asyncio.Queue()

    async def pump(i: int, stream: GenerationStream) -> None:
        try:
            async for event in serving.run(state, stream, arrival=arrival, prompt_tokens=prompt):
                await queue.put((i, event))
        except BaseException as exc:  # noqa: BLE001 - re-raised by the consumer
            await queue.put((i, exc))
        finally:
            await queue.put((i, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            i, item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                values = {f.name: getattr(item, f.name) for f in fields(item)}
                yield IndexedEvent(**values, index=i)
    finally:
        for task in tasks:
            task.cancel()
        for stream in streams:
            stream.cancel()


def stream_response(
    state: serving.ServingState,
    streams: list[GenerationStream],
    *,
    arrival: float,
    prompt_tokens: int,
    envelope: dict[str, Any],
    choice: Callable[[IndexedEvent], dict[str, Any]],
    include_usage: bool,
    first_choice: Callable[[int], dict[str, Any]] | None = None,
) -> EventSourceResponse:
    """SSE of all choices, interleaved as their tokens come (each chunk names its index)."""

    def stats() -> GenerationStats:
        return merged_stats([s.stats for s in streams])

    async def chunks() -> AsyncIterator[dict[str, Any]]:
        if first_choice is not None:
            for i in range(len(streams)):
                yield {**envelope, "choices": [first_choice(i)]}
        async for chunk in sse.completion_chunks(
            _merged(state, streams, arrival, prompt_tokens),
            envelope,
            choice,  # type: ignore[arg-type]
            final_extras=lambda: {"early_exit": telemetry.early_exit_usage(stats()).model_dump()},
            usage=(
                (lambda: telemetry.usage(stats(), prompt_tokens).model_dump())
                if include_usage
                else None
            ),
        ):
            yield chunk

    def cancel() -> None:
        for stream in streams:
            stream.cancel()

    return sse.response(chunks(), on_close=cancel)
