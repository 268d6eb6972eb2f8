"""What both completion endpoints share: server state, request -> engine params, running a request.

Routes stay thin: they fetch :class:`ServingState` from ``app.state``, call
:func:`prepare` to turn the pydantic request into one :class:`GenerationRequest`, then either
:func:`collect` the whole answer or iterate :func:`run` for streaming.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from sse_starlette.sse import EventSourceResponse

from octomil.config import EarlyExitSettings, resolve_early_exit
from octomil.engine.constraint import GrammarSpec
from octomil.engine.types import GenerationRequest, GenerationStats, SamplingParams, TokenEvent
from octomil.server import sse, telemetry
from octomil.server.drift import DEFAULT_MARGIN, DEFAULT_WINDOW, DriftAlarm
from octomil.server.engine_client import (
    EngineClient,
    EngineLike,
    EngineStoppedError,
    GenerationAbortedError,
    GenerationStream,
    ServerBusyError,
    Slot,
)
from octomil.server.errors import APIError
from octomil.server.exit_control import ExitControl
from octomil.server.heap_trim import DEFAULT_INTERVAL_S
from octomil.server.keys import KeyRing
from octomil.server.limits import Rate
from octomil.server.metrics import ServerMetrics
from octomil.server.protocol import EarlyExitOverride
from octomil.server.telemetry import EarlyExitTotals

logger = logging.getLogger("octomil.server")


@dataclass(frozen=True)
class ServeOptions:
    """Server knobs set from the CLI (``octomil serve``)."""

    api_key: str | None = None
    max_concurrency: int = 64
    telemetry_headers: bool = True
    # OpenAI has no default cap; on a CPU decoding ~12 tok/s an unbounded default is a trap.
    default_max_tokens: int = 512
    max_body_bytes: int = 4 * 1024 * 1024
    # Keys and limits (octomil.server.access); None: no limit.
    api_keys: tuple[str, ...] = ()
    admin_key: str | None = None
    rate_limit: Rate | None = None
    max_streams_per_key: int | None = None
    max_prompt_tokens: int | None = None
    max_tokens_limit: int | None = None
    max_messages: int | None = None
    request_timeout: float | None = None
    # Early-exit operation (octomil.server.exit_control).
    allow_aggressive_overrides: bool = False
    task_presets: dict[str, EarlyExitSettings] = field(default_factory=dict)
    shadow_rate: float = 0.0
    auto_fallback: bool = False
    drift_window: int = DEFAULT_WINDOW
    drift_margin: float = DEFAULT_MARGIN
    drift_budget: float | None = None  # None: the exit policy's calibrated budget
    heap_trim_interval: float = DEFAULT_INTERVAL_S  # octomil.server.heap_trim; 0: never

    @property
    def keys(self) -> KeyRing:
        both = (*self.api_keys, self.api_key) if self.api_key else self.api_keys
        return KeyRing.of(tuple(dict.fromkeys(both)), self.admin_key)


@dataclass
class ServingState:
    engine: EngineLike
    client: EngineClient
    metrics: ServerMetrics
    totals: EarlyExitTotals
    options: ServeOptions
    default_early_exit: EarlyExitSettings = field(default_factory=EarlyExitSettings)
    control: ExitControl = field(default_factory=lambda: ExitControl(EarlyExitSettings()))
    drift: DriftAlarm | None = None


def get_state(request: Request) -> ServingState:
    """The loaded serving state, or 503 while the model is still loading."""
    state: ServingState | None = getattr(request.app.state, "serving", None)
    if state is None:
        raise APIError(503, "the model is still loading; retry shortly", code="model_not_ready")
    return state


def check_model(state: ServingState, model: str) -> None:
    if model != state.engine.model_id:
        raise APIError(
            404,
            f"the model {model!r} does not exist; this server serves {state.engine.model_id!r}",
            param="model",
            code="model_not_found",
        )


def early_exit_settings(
    state: ServingState, override: bool | EarlyExitOverride | None, task: str | None = None
) -> EarlyExitSettings:
    """Per-request ``early_exit`` field (and task class) -> the settings the request decodes
    with, through the run-time control: kill switch, override ceiling, task presets."""
    resolved = state.control.resolve(_requested(state, override), task)
    if resolved.capped:
        logger.info("early_exit override capped at the server's ceiling: %s", resolved.settings)
    return resolved.settings


def task(field: str | None, raw: Request) -> str | None:
    """The request's task class: its ``task`` field, else the ``X-Octomil-Task`` header."""
    return field or raw.headers.get("x-octomil-task") or None


def _requested(
    state: ServingState, override: bool | EarlyExitOverride | None
) -> EarlyExitSettings | None:
    """What the client asked for (None: nothing, the server default)."""
    if override is None or override is True:
        return None
    if override is False:
        return EarlyExitSettings()
    if override.speed_quality is not None:
        return resolve_early_exit(preset=override.speed_quality)
    threshold = override.threshold
    if threshold is None:
        if override.min_layers is None:
            return None
        threshold = state.control.default.threshold
        if threshold is None:
            raise APIError(
                400,
                "early_exit.min_layers needs a threshold or speed_quality "
                "(early exit is off by default on this server)",
                param="early_exit.min_layers",
                code="invalid_value",
            )
    return resolve_early_exit(threshold=threshold, min_layers_fraction=override.min_layers)


def sampling_params(
    state: ServingState,
    *,
    prompt_len: int,
    max_tokens: int | None,
    temperature: float | None,
    top_p: float | None,
    seed: int | None,
    stop: str | list[str] | None,
    logprobs: int | None,
    prompt_param: str,
    grammar: GrammarSpec | None = None,
    frequency_penalty: float | None = None,
    presence_penalty: float | None = None,
    logit_bias: dict[str, float] | None = None,
) -> SamplingParams:
    context = state.engine.context_length
    limits = state.options
    if limits.max_prompt_tokens is not None and prompt_len > limits.max_prompt_tokens:
        raise APIError(
            400,
            f"the prompt has {prompt_len} tokens; this server accepts at most "
            f"{limits.max_prompt_tokens} (--max-prompt-tokens)",
            param=prompt_param,
            code="prompt_too_long",
        )
    if (
        limits.max_tokens_limit is not None
        and max_tokens is not None
        and max_tokens > limits.max_tokens_limit
    ):
        raise APIError(
            400,
            f"max_tokens is {max_tokens}; this server allows at most {limits.max_tokens_limit} "
            "(--max-tokens-limit)",
            param="max_tokens",
            code="max_tokens_too_large",
        )
    if prompt_len >= context:
        raise APIError(
            400,
            f"this model's maximum context length is {context} tokens, but the prompt has "
            f"{prompt_len} tokens",
            param=prompt_param,
            code="context_length_exceeded",
        )
    if max_tokens is None:
        max_tokens = min(state.options.default_max_tokens, context - prompt_len)
        if limits.max_tokens_limit is not None:
            max_tokens = min(max_tokens, limits.max_tokens_limit)
    elif prompt_len + max_tokens > context:
        raise APIError(
            400,
            f"this model's maximum context length is {context} tokens; the prompt has "
            f"{prompt_len} tokens and max_tokens asks for {max_tokens} more "
            f"(at most {context - prompt_len})",
            param="max_tokens",
            code="context_length_exceeded",
        )
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    temperature = 1.0 if temperature is None else temperature
    top_p = 1.0 if top_p is None else top_p
    if top_p == 0.0:  # an empty nucleus means "the most likely token": greedy
        temperature, top_p = 0.0, 1.0
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        # The sampler takes an unsigned 64-bit seed; OpenAI allows negative int64 seeds.
        seed=None if seed is None else seed % 2**64,
        stop=tuple(s for s in stops if s),
        logprobs=logprobs,
        grammar=grammar,
        frequency_penalty=frequency_penalty or 0.0,
        presence_penalty=presence_penalty or 0.0,
        logit_bias=tuple((int(k), float(v)) for k, v in (logit_bias or {}).items()),
    )


def check_messages(state: ServingState, count: int) -> None:
    limit = state.options.max_messages
    if limit is not None and count > limit:
        raise APIError(
            400,
            f"the request has {count} messages; this server accepts at most {limit} "
            "(--max-messages)",
            param="messages",
            code="too_many_messages",
        )


def admit(state: ServingState) -> Slot:
    """Take an admission slot before any work on a request; busy -> 429, shutting down -> 503.

    Use as ``with admit(state) as slot:`` around tokenizing and :func:`start`, which hands the
    slot to the running request (released when it ends) or frees it on an error.
    """
    try:
        return state.client.reserve()
    except ServerBusyError as exc:
        raise APIError(429, str(exc), code="server_busy", headers={"Retry-After": "1"}) from None
    except EngineStoppedError as exc:
        raise APIError(503, str(exc), code="shutting_down") from None


async def start(state: ServingState, request: GenerationRequest, slot: Slot) -> GenerationStream:
    """Submit an admitted request to the engine."""
    try:
        return await state.client.generate(request, slot)
    except EngineStoppedError as exc:
        raise APIError(503, str(exc), code="shutting_down") from None


async def tokenize(state: ServingState, fn: Callable[..., list[int]], *args: Any) -> list[int]:
    """Tokenize on a worker thread (never the engine thread), after a cheap size check: text
    longer than the context could hold even at the longest token is refused without work."""
    limit = state.engine.max_prompt_chars
    size = sum(_text_length(a) for a in args)
    if size > limit:
        raise APIError(
            400,
            f"the prompt has {size} characters, more than this model's context of "
            f"{state.engine.context_length} tokens can hold",
            param="messages" if isinstance(args[0], list) else "prompt",
            code="context_length_exceeded",
        )
    return list(await asyncio.to_thread(fn, *args))


def _text_length(value: Any) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(_text_length(v) for v in value.values())
    if isinstance(value, list | tuple):
        return sum(_text_length(v) for v in value)
    return 0


async def run(
    state: ServingState,
    stream: GenerationStream,
    *,
    arrival: float,
    prompt_tokens: int,
    http_request: Request | None = None,
) -> AsyncIterator[TokenEvent]:
    """Yield token events while recording metrics; cancels on client disconnect.

    Tokens are yielded as they arrive; the engine's last event (the one with ``finish_reason``)
    only after the generation ended, so ``stream.stats`` is final when the caller sees it.
    """
    m = state.metrics
    m.prompt_tokens.inc(prompt_tokens)
    m.prompt_tokens_per_request.observe(prompt_tokens)
    state.totals.requests += 1
    last: float | None = None
    pending: TokenEvent | None = None
    finish_reason = "cancelled"
    timeout = state.options.request_timeout
    deadline = None if timeout is None else arrival + timeout
    try:
        async for event in _until(stream, deadline, timeout):
            now = time.perf_counter()
            if last is None:
                m.ttft.observe(now - arrival)
            else:
                m.itl.observe(now - last)
            last = now
            m.record_token(event)
            state.totals.record_token(event)
            if event.shadow and state.drift is not None and stream.request.early_exit:
                state.drift.record(stream.request.early_exit, event.shadow)
            if event.finish_reason is not None:
                pending = event  # held until the generation ended: its stats are final then
                continue
            yield event
            if http_request is not None and await http_request.is_disconnected():
                stream.cancel()
                return
        if pending is not None:
            finish_reason = pending.finish_reason or "stop"
            yield pending
    except APIError as exc:
        if exc.code == "request_timeout":
            finish_reason = "timeout"
        raise
    finally:
        stream.cancel()  # no-op when finished; frees the slot when the consumer went away
        m.e2e.observe(time.perf_counter() - arrival)
        m.record_finished(finish_reason)
        m.speculative.record(stream.stats.speculative)


async def _until(
    stream: GenerationStream, deadline: float | None, timeout: float | None
) -> AsyncIterator[TokenEvent]:
    """``stream``'s events until ``deadline`` (perf_counter); then 504 ``request_timeout``."""
    events = aiter(stream)
    while True:
        try:
            if deadline is None:
                event = await anext(events)
            else:
                left = max(0.0, deadline - time.perf_counter())
                event = await asyncio.wait_for(anext(events), left)
        except StopAsyncIteration:
            return
        except TimeoutError:
            stream.cancel()
            raise APIError(
                504,
                f"the request did not finish within {timeout:g} s (--request-timeout)",
                code="request_timeout",
                type="timeout_error",
                # The openai SDKs retry a 5xx twice unless told not to: the same request would
                # run into the same limit, and a timeout under load would add load.
                headers={"x-should-retry": "false"},
            ) from None
        yield event


@dataclass
class Collected:
    text: str
    events: list[TokenEvent]
    finish_reason: str
    stats: GenerationStats


def stream_response(
    state: ServingState,
    stream: GenerationStream,
    *,
    arrival: float,
    prompt_tokens: int,
    envelope: dict[str, Any],
    choice: Callable[[TokenEvent], dict[str, Any]],
    include_usage: bool,
    first_choice: dict[str, Any] | None = None,
) -> EventSourceResponse:
    """SSE response of a streaming completion: token chunks, early-exit figures in the final one,
    then the usage chunk when asked for; disconnecting cancels the generation."""
    stats = stream.stats
    chunks = sse.completion_chunks(
        run(state, stream, arrival=arrival, prompt_tokens=prompt_tokens),
        envelope,
        choice,
        first_choice=first_choice,
        final_extras=lambda: telemetry.final_extras(stats),
        usage=(
            (lambda: telemetry.usage(stats, prompt_tokens).model_dump()) if include_usage else None
        ),
    )
    return sse.response(chunks, on_close=stream.cancel)


async def collect(
    state: ServingState,
    stream: GenerationStream,
    *,
    arrival: float,
    prompt_tokens: int,
    http_request: Request,
) -> Collected:
    try:
        events = [
            e
            async for e in run(
                state,
                stream,
                arrival=arrival,
                prompt_tokens=prompt_tokens,
                http_request=http_request,
            )
        ]
    except GenerationAbortedError as exc:
        raise APIError(503, str(exc), code="shutting_down") from None
    finish = events[-1].finish_reason if events else None
    return Collected(
        text="".join(e.text for e in events),
        events=events,
        finish_reason=finish or "stop",
        stats=stream.stats,
    )
