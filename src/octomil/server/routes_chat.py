"""POST /v1/chat/completions: the model's chat template, then the shared serving path."""

from __future__ import annotations

import asyncio
import contextlib
import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from octomil.engine.types import GenerationRequest, TokenEvent, TokenLogprob
from octomil.server import choices, serving, structured, telemetry, tools
from octomil.server.errors import APIError
from octomil.server.protocol import ChatCompletionRequest
from octomil.server.protocol_responses import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatTokenLogprob,
    ErrorResponse,
    TopLogprob,
    new_id,
    now,
)
from octomil.server.speculative import speculative_settings

router = APIRouter()

_ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 429, 503)}


def _top(lp: TokenLogprob) -> TopLogprob:
    return TopLogprob(token=lp.text, logprob=lp.logprob, bytes=list(lp.text.encode()))


def _token_logprob(event: TokenEvent) -> ChatTokenLogprob | None:
    if event.logprob is None:
        return None
    return ChatTokenLogprob(
        **_top(event.logprob).model_dump(), top_logprobs=[_top(t) for t in event.top_logprobs]
    )


def _logprobs(events: list[TokenEvent], wanted: bool) -> ChatLogprobs | None:
    if not wanted:
        return None
    return ChatLogprobs(content=[lp for e in events if (lp := _token_logprob(e)) is not None])


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletionResponse,
    responses={**_ERRORS, 200: {"content": {"text/event-stream": {}}}},
)
async def create_chat_completion(body: ChatCompletionRequest, raw: Request):  # noqa: ANN201
    arrival = time.perf_counter()
    state = serving.get_state(raw)
    serving.check_model(state, body.model)
    serving.check_messages(state, len(body.messages))
    grammar = structured.grammar_spec(
        body.response_format, body.guided_regex, body.guided_choice, body.guided_grammar
    )
    syntax = state.engine.tool_syntax
    tool_plan = tools.plan(body, syntax)
    if tool_plan.grammar is not None:
        if grammar is not None:
            raise APIError(
                400,
                f"{grammar.param} cannot be combined with tool calls (unless tool_choice='none')",
                param=grammar.param,
                code="invalid_value",
            )
        grammar = tool_plan.grammar
    early_exit = serving.early_exit_settings(state, body.early_exit, serving.task(body.task, raw))
    speculative = speculative_settings(state.engine, body.speculative)
    # "developer" is the newer name of "system"; chat templates know only the latter.
    messages = [tools.engine_message(i, m) for i, m in enumerate(body.messages)]
    n = body.n or 1
    with contextlib.ExitStack() as stack:  # admission before any work on the request
        slots = choices.admit(state, n, stack)
        prompt = await serving.tokenize(
            state, state.engine.encode_chat, messages, tool_plan.functions
        )
        want_logprobs = bool(body.logprobs)
        params = serving.sampling_params(
            state,
            prompt_len=len(prompt),
            max_tokens=body.max_completion_tokens or body.max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            seed=body.seed,
            stop=body.stop,
            logprobs=(body.top_logprobs or 0) if want_logprobs else None,
            prompt_param="messages",
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
    request_id, created = new_id("chatcmpl"), now()

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        calls = [tools.ToolCallDeltas(syntax) for _ in range(n)] if tool_plan.reads_calls else None

        def choice(event: TokenEvent) -> dict:
            index = getattr(event, "index", 0)
            finish = event.finish_reason
            logprobs = None
            if want_logprobs and (lp := _token_logprob(event)):
                logprobs = {"content": [lp.model_dump()]}
            if calls is not None:
                delta = calls[index].delta(event.text)
                if finish == "stop" and calls[index].calls:
                    finish = "tool_calls"
            else:
                delta = {"content": event.text} if event.text or finish is None else {}
            return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}

        return choices.stream_response(
            state,
            streams,
            arrival=arrival,
            prompt_tokens=len(prompt),
            envelope={
                "id": request_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": state.engine.model_id,
            },
            choice=choice,
            include_usage=include_usage,
            first_choice=lambda i: {
                "index": i,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            },
        )

    dones = await asyncio.gather(
        *(
            serving.collect(
                state, stream, arrival=arrival, prompt_tokens=len(prompt), http_request=raw
            )
            for stream in streams
        )
    )
    answers, any_calls = [], False
    for i, done in enumerate(dones):
        content, tool_calls, finish = done.text, [], done.finish_reason
        if tool_plan.reads_calls:
            content, tool_calls = tools.read_calls(done.text, syntax)
            if tool_calls and finish == "stop":
                finish = "tool_calls"
        any_calls = any_calls or bool(tool_calls)
        message = AssistantMessage(content=content, tool_calls=tool_calls or None)
        logprobs = _logprobs(done.events, want_logprobs)
        answers.append(
            ChatChoice(index=i, message=message, logprobs=logprobs, finish_reason=finish)
        )
    stats = choices.merged_stats([d.stats for d in dones])
    response = ChatCompletionResponse(
        id=request_id,
        created=created,
        model=state.engine.model_id,
        choices=answers,
        usage=telemetry.usage(stats, len(prompt)),
    )
    payload = response.model_dump()
    for answer in payload["choices"]:  # as OpenAI: the key appears only with calls
        if answer["message"]["tool_calls"] is None:
            del answer["message"]["tool_calls"]
    headers = telemetry.headers(stats) if state.options.telemetry_headers else None
    return JSONResponse(payload, headers=headers)
