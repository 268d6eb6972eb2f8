"""POST /v1/completions: plain prompt (text or token ids), then the shared serving path."""

from __future__ import annotations

import asyncio
import contextlib
import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from octomil.engine.types import GenerationRequest, TokenEvent
from octomil.server import choices, serving, structured, telemetry
from octomil.server.errors import APIError
from octomil.server.protocol import CompletionRequest
from octomil.server.protocol_responses import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    ErrorResponse,
    new_id,
    now,
)
from octomil.server.speculative import speculative_settings

router = APIRouter()

_ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 429, 503)}


def _logprobs(events: list[TokenEvent], offset: int = 0) -> CompletionLogprobs:
    tokens, token_logprobs, top, offsets = [], [], [], []
    for e in events:
        if e.logprob is None:
            continue
        tokens.append(e.logprob.text)
        token_logprobs.append(e.logprob.logprob)
        top.append({t.text: t.logprob for t in e.top_logprobs})
        offsets.append(offset)
        offset += len(e.logprob.text)
    return CompletionLogprobs(
        tokens=tokens, token_logprobs=token_logprobs, top_logprobs=top, text_offset=offsets
    )


@router.post(
    "/v1/completions",
    response_model=CompletionResponse,
    responses={**_ERRORS, 200: {"content": {"text/event-stream": {}}}},
)
async def create_completion(body: CompletionRequest, raw: Request):  # noqa: ANN201
    arrival = time.perf_counter()
    state = serving.get_state(raw)
    serving.check_model(state, body.model)
    if body.echo:
        raise APIError(400, "echo is not supported yet", param="echo", code="unsupported_value")
    if body.suffix:
        raise APIError(400, "suffix is not supported", param="suffix", code="unsupported_value")
    early_exit = serving.early_exit_settings(state, body.early_exit, serving.task(body.task, raw))
    speculative = speculative_settings(state.engine, body.speculative)
    grammar = structured.grammar_spec(
        None, body.guided_regex, body.guided_choice, body.guided_grammar
    )
    prompt_in = (
        body.prompt[0]
        if isinstance(body.prompt, list) and isinstance(body.prompt[0], str)
        else body.prompt
    )
    n = body.n or 1
    with contextlib.ExitStack() as stack:  # admission before any work on the request
        slots = choices.admit(state, n, stack)
        if isinstance(prompt_in, str):
            prompt = await serving.tokenize(state, state.engine.encode, prompt_in)
        else:
            prompt = list(prompt_in)  # token ids: the engine checks their range
        if not prompt:
            raise APIError(400, "prompt is empty", param="prompt", code="invalid_value")
        params = serving.sampling_params(
            state,
            prompt_len=len(prompt),
            max_tokens=body.max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            seed=body.seed,
            stop=body.stop,
            logprobs=body.logprobs,
            prompt_param="prompt",
            grammar=grammar,
            frequency_penalty=body.frequency_penalty,
            presence_penalty=body.presence_penalty,
            logit_bias=body.logit_bias,
        )
        requests = [
            GenerationRequest(tuple(prompt), choices.seeded(params, i), early_exit, speculative)
            for i in range(n)
        ]
        streams = await choices.start(state, requests, slots)
    request_id, created = new_id("cmpl"), now()
    want_logprobs = body.logprobs is not None

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def choice(event: TokenEvent) -> dict:
            logprobs = None
            if want_logprobs and event.logprob is not None:
                logprobs = _logprobs([event]).model_dump()
            return {
                "index": getattr(event, "index", 0),
                "text": event.text,
                "logprobs": logprobs,
                "finish_reason": event.finish_reason,
            }

        return choices.stream_response(
            state,
            streams,
            arrival=arrival,
            prompt_tokens=len(prompt),
            envelope={
                "id": request_id,
                "object": "text_completion",
                "created": created,
                "model": state.engine.model_id,
            },
            choice=choice,
            include_usage=include_usage,
        )

    dones = await asyncio.gather(
        *(
            serving.collect(
                state, stream, arrival=arrival, prompt_tokens=len(prompt), http_request=raw
            )
            for stream in streams
        )
    )
    stats = choices.merged_stats([d.stats for d in dones])
    response = CompletionResponse(
        id=request_id,
        created=created,
        model=state.engine.model_id,
        choices=[
            CompletionChoice(
                index=i,
                text=done.text,
                logprobs=_logprobs(done.events) if want_logprobs else None,
                finish_reason=done.finish_reason,
            )
            for i, done in enumerate(dones)
        ],
        usage=telemetry.usage(stats, len(prompt)),
    )
    headers = telemetry.headers(stats) if state.options.telemetry_headers else None
    return JSONResponse(response.model_dump(), headers=headers)
