"""Structured outputs on the real embedded model through the ``openai`` SDK: every output of a
JSON-schema request parses and validates at full depth and at every early-exit preset, plain and
streamed; JSON mode, regex and choice outputs match; bad grammars are 400s naming the problem.

Kept short (one generation per schema and preset) so that ``make test`` stays fast: the cases
alternate plain and streamed so that each schema and each preset is seen both ways.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest
from conftest import MODEL, ServerProcess

# The raw shared head: the calibrated policy places no exit check on this CPU, the lens does,
# so the presets below really exit (mid-JSON) and the mask must hold there.
SERVER_ARGS = ("--speed-quality", "balanced", "--exit-policy", "lens")
CASES = json.loads(
    (Path(__file__).parents[2] / "benchmarks" / "prompts" / "structured_cases.json").read_text()
)
SCHEMAS = list(CASES["schemas"].items())
PRESETS = [False, "quality", "balanced", "fast"]  # False: full depth


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)


def _early_exit(preset: str | bool) -> dict:
    return {"early_exit": preset if preset is False else {"speed_quality": preset}}


def _ask(client: openai.OpenAI, prompt: str, stream: bool, **kwargs) -> tuple[str, str, dict]:
    """(text, finish_reason, usage-or-final-early-exit) of one chat completion."""
    messages = [{"role": "user", "content": prompt}]
    if not stream:
        r = client.chat.completions.create(model=MODEL, messages=messages, **kwargs)
        return r.choices[0].message.content, r.choices[0].finish_reason, r.usage.model_dump()
    text, finish, usage = "", None, {}
    for chunk in client.chat.completions.create(
        model=MODEL,
        messages=messages,
        stream=True,
        stream_options={"include_usage": True},
        **kwargs,
    ):
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage is not None:
            usage = chunk.usage.model_dump()
    return text, finish, usage


@pytest.mark.parametrize(
    ("name", "preset", "stream"),
    [
        (name, preset, (i + j) % 2 == 1)
        for i, (name, _) in enumerate(SCHEMAS)
        for j, preset in enumerate(PRESETS)
    ],
)
def test_json_schema_outputs_validate(client, name: str, preset, stream: bool) -> None:
    case = CASES["schemas"][name]
    text, finish, usage = _ask(
        client,
        case["prompt"],
        stream,
        max_tokens=60,
        temperature=0,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": name, "schema": case["schema"], "strict": True},
        },
        extra_body=_early_exit(preset),
    )
    assert finish == "stop", text
    jsonschema.validate(json.loads(text), case["schema"])
    ee = usage["early_exit"]
    assert 0 < ee["forced_tokens"] < usage["completion_tokens"]
    if preset in ("balanced", "fast"):
        assert ee["early_exit_tokens"] > 0  # exits did happen inside the JSON


def test_json_object_mode_gives_an_object(client) -> None:
    text, finish, _ = _ask(
        client,
        "Describe Paris as a JSON object with keys city and country.",
        False,
        max_tokens=40,
        temperature=0,
        response_format={"type": "json_object"},
        extra_body={"early_exit": False},  # any object may be long: the full-depth answer is short
    )
    assert finish == "stop" and isinstance(json.loads(text), dict)


@pytest.mark.parametrize("stream", [False, True])
def test_guided_regex_and_choice(client, stream: bool) -> None:
    regex = CASES["regex"]
    text, finish, _ = _ask(
        client,
        regex["prompt"],
        stream,
        max_tokens=20,
        extra_body={"guided_regex": regex["pattern"]},
    )
    assert re.fullmatch(regex["pattern"], text) and finish == "stop"
    choice = CASES["choice"]
    text, finish, _ = _ask(
        client,
        choice["prompt"],
        stream,
        max_tokens=20,
        extra_body={"guided_choice": choice["choices"]},
    )
    assert text in choice["choices"] and finish == "stop"


def test_completions_take_guided_fields(client) -> None:
    r = client.completions.create(
        model=MODEL, prompt="The year is", max_tokens=10, extra_body={"guided_regex": " [0-9]{4}"}
    )
    assert re.fullmatch(" [0-9]{4}", r.choices[0].text)


def test_unfinished_schema_at_max_tokens_is_length(client) -> None:
    """A schema that cannot be completed within max_tokens is never claimed complete."""
    name, case = SCHEMAS[0]
    text, finish, _ = _ask(
        client,
        case["prompt"],
        False,
        max_tokens=4,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": name, "schema": case["schema"]},
        },
    )
    assert finish == "length"
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


def _post(server: ServerProcess, body: dict) -> httpx.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **body}
    return httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=60)


@pytest.mark.parametrize(
    ("body", "param", "fragment"),
    [
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "nope"}},
                }
            },
            "response_format.json_schema.schema",
            "Invalid type: nope",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"not": {}}},
                }
            },
            "response_format.json_schema.schema",
            'Unimplemented keys: ["not"]',
        ),
        ({"guided_regex": "[a-"}, "guided_regex", "unclosed character class"),
        ({"guided_grammar": "start: ("}, "guided_grammar", "invalid grammar"),
        ({"guided_choice": []}, "guided_choice", "at least 1 item"),
        (
            {"guided_regex": "a", "guided_choice": ["a"]},
            "guided_choice",
            "give at most one of",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "response_format.json_schema.schema",
            "missing required parameter",
        ),
    ],
)
def test_bad_grammars_are_400_naming_the_problem(server, body, param, fragment) -> None:
    r = _post(server, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and fragment in err["message"], err


EXTRACT_PROMPT = (
    "Extract the person as JSON with keys name, city and year. Text: Ada Lovelace was born in "
    "London in 1815 and wrote the first program for Charles Babbage's engine."
)
EXTRACT_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "city": {"type": "string", "maxLength": 30},
        "year": {"type": "integer", "minimum": 1000, "maximum": 2100},
    },
    "required": ["name", "city", "year"],
    "additionalProperties": False,
}


@pytest.mark.parametrize(
    ("preset", "stream"), [(False, False), (False, True), ("balanced", True), ("balanced", False)]
)
def test_json_schema_with_lookup_speculation_equals_without(client, preset, stream: bool) -> None:
    """Drafts and verification rows are masked: the same JSON as without speculation, at full
    depth and with exits, and speculation really ran (``usage.speculative``)."""
    response_format = {
        "type": "json_schema",
        "json_schema": {"name": "person", "schema": EXTRACT_SCHEMA, "strict": True},
    }
    runs = [
        _ask(
            client,
            EXTRACT_PROMPT,
            stream,
            max_tokens=60,
            temperature=0,
            response_format=response_format,
            extra_body={**_early_exit(preset), "speculative": speculative},
        )
        for speculative in (False, {"mode": "lookup"})
    ]
    (plain, plain_finish, plain_usage), (text, finish, usage) = runs
    assert (text, finish) == (plain, plain_finish) and finish == "stop"
    assert usage["completion_tokens"] == plain_usage["completion_tokens"]
    jsonschema.validate(json.loads(text), EXTRACT_SCHEMA)
    assert usage["speculative"]["drafts"] > 0 and usage["speculative"]["accepted_tokens"] > 0
    assert plain_usage["speculative"] is None
