"""Tool calling through the ``openai`` SDK: call -> tool result -> answer, plain and streamed.

The server runs a tiny random llama saved as an mlx-lm model directory with a tools-capable chat
template (Qwen2.5's shape, ``tools_template.py``): random weights say nothing about quality, but
the grammar makes every call well formed, so the mechanics are exact.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest
from conftest import ServerProcess, start_server, stop_server

sys.path.insert(0, str(Path(__file__).parents[1]))
sys.path.insert(0, str(Path(__file__).parents[1] / "unit"))
import tiny_models  # noqa: E402
from tools_template import TOOLS_TEMPLATE  # noqa: E402

MODEL = "tiny-tools"
WEATHER_ARGS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 6},
        "unit": {"enum": ["c", "f"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather now",
            "parameters": WEATHER_ARGS,
        },
    },
    {
        "type": "function",
        "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
    },
]
ASK = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    path = tmp_path_factory.mktemp("models") / MODEL
    tokenizer = tiny_models.make_byte_tokenizer()
    tokenizer.chat_template = TOOLS_TEMPLATE
    model = tiny_models.make_tiny_model("llama", seed=7)
    tiny_models.save_tiny_checkpoint(path, model, tokenizer, eos_token_id=256)
    srv = start_server(str(path))
    try:
        yield srv
    finally:
        stop_server(srv)


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)


def test_call_tool_result_answer_round_trip(client: openai.OpenAI) -> None:
    first = client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=120,
        seed=1,
    )
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name in ("get_weather", "get_time")
    if call.function.name == "get_weather":
        jsonschema.validate(json.loads(call.function.arguments), WEATHER_ARGS)
    messages = [
        *ASK,
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"},
    ]
    answer = client.chat.completions.create(
        model=MODEL, messages=messages, tools=TOOLS, tool_choice="none", max_tokens=5
    )
    assert answer.choices[0].message.tool_calls is None
    assert isinstance(answer.choices[0].message.content, str)
    assert answer.choices[0].finish_reason in ("stop", "length")
    # The tool result reached the prompt: the second request is longer by at least its text.
    assert answer.usage.prompt_tokens > first.usage.prompt_tokens + len("sunny, 21 C")


def test_named_tool_choice_streams_call_deltas(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=120,
        stream=True,
    )
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        delta = chunk.choices[0].delta
        assert not delta.content
        for d in delta.tool_calls or []:
            entry = calls.setdefault(d.index, {"id": d.id, "name": "", "arguments": ""})
            entry["name"] += d.function.name or ""
            entry["arguments"] += d.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and list(calls) == [0]
    assert calls[0]["name"] == "get_weather" and calls[0]["id"].startswith("call_")
    jsonschema.validate(json.loads(calls[0]["arguments"]), WEATHER_ARGS)


def test_auto_gives_a_call_or_text(client: openai.OpenAI) -> None:
    for seed in range(3):
        r = client.chat.completions.create(
            model=MODEL, messages=ASK, tools=TOOLS, max_tokens=120, seed=seed, temperature=1.0
        )
        message, finish = r.choices[0].message, r.choices[0].finish_reason
        if message.tool_calls:
            assert finish == "tool_calls" and message.content is None
        else:
            assert finish in ("stop", "length") and not message.content.startswith("<")


def _post(server: ServerProcess, **body) -> httpx.Response:
    body = {"model": MODEL, "messages": ASK, **body}
    return httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=60)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (
            {"tools": [{"type": "function", "function": {"description": "x"}}]},
            "tools.0.function.name",
        ),
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
        ),
        ({"tool_choice": "required"}, "tool_choice"),
        (
            {
                "tools": [
                    {"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}
                ]
            },
            "tools",
        ),
        (
            {
                "messages": [
                    *ASK,
                    {
                        "role": "assistant",
                        "tool_calls": [
                            {
                                "id": "c",
                                "type": "function",
                                "function": {"name": "f", "arguments": "[1"},
                            }
                        ],
                    },
                ]
            },
            "messages.1.tool_calls.0.function.arguments",
        ),
    ],
)
def test_bad_tool_requests_are_400(server: ServerProcess, body: dict, param: str) -> None:
    r = _post(server, **body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
