"""Tool calls in the model's own template syntax through the ``openai`` SDK: a tiny random llama
served with Llama 3.1's and with Mistral v0.3's chat template (``tools_template.py``) calls a
tool, gets the result back through the template, and answers; streamed calls arrive as deltas.
Random weights say nothing about quality; the grammar makes every call well formed."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import openai
import pytest
from conftest import ServerProcess, start_server, stop_server

sys.path.insert(0, str(Path(__file__).parents[1]))
sys.path.insert(0, str(Path(__file__).parents[1] / "unit"))
import tiny_models  # noqa: E402
from tools_template import family_tokenizer  # noqa: E402

WEATHER_ARGS = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 6}, "unit": {"enum": ["c", "f"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather", "parameters": WEATHER_ARGS},
    }
]
ASK = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture(scope="module", params=["llama3", "mistral"])
def server(request: pytest.FixtureRequest, tmp_path_factory) -> Iterator[ServerProcess]:
    path = tmp_path_factory.mktemp("models") / f"tiny-{request.param}"
    model = tiny_models.make_tiny_model("llama", seed=7)
    tiny_models.save_tiny_checkpoint(
        path,
        model,
        family_tokenizer(request.param),
        eos_token_id=256,
        max_position_embeddings=4096,
    )
    srv = start_server(str(path))
    srv.family = request.param  # type: ignore[attr-defined]
    srv.model = path.name  # type: ignore[attr-defined]
    try:
        yield srv
    finally:
        stop_server(srv)


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)


def test_call_tool_result_answer_round_trip(server, client: openai.OpenAI) -> None:
    first = client.chat.completions.create(
        model=server.model,
        messages=ASK,
        tools=TOOLS,
        tool_choice="required",
        max_tokens=200,
        seed=1,
    )
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER_ARGS)
    if server.family == "mistral":  # its template refuses other ids
        assert len(call.id) == 9 and call.id.isalnum()
    messages = [
        *ASK,
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"},
    ]
    answer = client.chat.completions.create(
        model=server.model, messages=messages, tools=TOOLS, tool_choice="none", max_tokens=5
    )
    assert answer.choices[0].message.tool_calls is None
    assert isinstance(answer.choices[0].message.content, str)
    # The call and its result reached the prompt through the template.
    assert answer.usage.prompt_tokens > first.usage.prompt_tokens + len("sunny, 21 C")


def test_streamed_call_arrives_as_deltas(server, client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=server.model,
        messages=ASK,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=200,
        seed=2,
        stream=True,
    )
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        delta = chunk.choices[0].delta
        assert not delta.content
        for d in delta.tool_calls or []:
            entry = calls.setdefault(d.index, {"name": "", "arguments": ""})
            entry["name"] += d.function.name or ""
            entry["arguments"] += d.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and list(calls) == [0]
    assert calls[0]["name"] == "get_weather"
    jsonschema.validate(json.loads(calls[0]["arguments"]), WEATHER_ARGS)
