"""Tool-call syntax per chat-template family (``engine.tool_syntax``): each family's template is
detected, its calls are generated under its own grammar, read back by its own parser (whole and
streamed) and rendered back through the template, on tiny random models whose tokenizers carry
the Llama 3.1, Mistral v0.3 and Qwen2.5-style templates."""

import json
import sys
from pathlib import Path

import jsonschema
import pytest
import tiny_models
from tool_delta_assembly import assemble

from octomil.engine.constraint import GrammarSpec
from octomil.engine.tool_calls import Function
from octomil.engine.tool_syntax import HERMES, LLAMA3, MISTRAL, json_value_end
from octomil.engine.types import GenerationRequest, SamplingParams
from octomil.server.tools import ToolCallDeltas, read_calls

sys.path.insert(0, str(Path(__file__).parents[1]))
from tools_template import family_tokenizer  # noqa: E402

WEATHER_ARGS = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 6}, "unit": {"enum": ["c", "f"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
FUNCTIONS = [
    Function("get_weather", "Weather now", WEATHER_ARGS),
    Function("get_time", None, {"type": "object", "properties": {}, "additionalProperties": False}),
]
ASK = [{"role": "user", "content": "Weather in Paris?"}]
FAMILIES = ("hermes", "llama3", "mistral")


@pytest.fixture(scope="module")
def engines():
    return {
        f: tiny_models.tiny_engine(
            tiny_models.make_tiny_model("llama", seed=7), family_tokenizer(f), context_length=2048
        )
        for f in FAMILIES
    }


def _generate(engine, grammar: str, seed: int, max_tokens: int = 400) -> list[str]:
    """The text pieces of a sampled completion under ``grammar``; finished unless max_tokens
    is small."""
    prompt = engine.encode_chat(ASK, FUNCTIONS)
    params = SamplingParams(
        max_tokens=max_tokens, temperature=1.0, seed=seed, grammar=GrammarSpec("grammar", grammar)
    )
    events = list(engine.generate(GenerationRequest(tuple(prompt), params)))
    assert max_tokens < 400 or events[-1].finish_reason == "stop"
    return [e.text for e in events]


def test_each_template_family_gets_its_own_syntax(engines):
    assert [engines[f].tool_syntax.family for f in FAMILIES] == list(FAMILIES)
    # Mistral's marker is its control token, matched by id in the grammar.
    mistral = engines["mistral"]
    assert mistral.tool_syntax.calls_token == mistral.tokenizer.convert_tokens_to_ids(
        "[TOOL_CALLS]"
    )
    no_tools = tiny_models.make_byte_tokenizer()
    no_tools.chat_template = "{% for m in messages %}{{ m.content }}{% endfor %}"
    assert tiny_models.tiny_engine(tiny_models.make_tiny_model("llama"), no_tools).tool_syntax is (
        HERMES
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_calls_follow_the_family_syntax_and_read_back(engines, family):
    engine = engines[family]
    syntax = engine.tool_syntax
    for seed in range(3):
        grammar = syntax.grammar(FUNCTIONS, required=True, parallel=True)
        pieces = _generate(engine, grammar, seed)
        text = "".join(pieces)
        content, calls = read_calls(text, syntax)
        assert content is None and calls, text
        for call in calls:
            if call.function.name == "get_weather":
                jsonschema.validate(json.loads(call.function.arguments), WEATHER_ARGS)
            assert len(call.id) == 9 if family == "mistral" else call.id.startswith("call_")
        if family == "llama3":
            assert text.startswith('{"name": "') and '"parameters": ' in text
            assert len(calls) == 1  # one call per message, as the template renders them
        elif family == "mistral":
            assert text.startswith("[TOOL_CALLS] [")
        else:
            assert text.startswith("<tool_call>\n")
        streamed = ToolCallDeltas(syntax)
        deltas = [streamed.delta(p) for p in pieces]
        got = assemble(deltas)
        assert [(g["name"], json.loads(g["arguments"])) for g in got.values()] == [
            (c.function.name, json.loads(c.function.arguments)) for c in calls
        ]
        assert not any("content" in d for d in deltas)


@pytest.mark.parametrize("family", FAMILIES)
def test_auto_allows_text_that_cannot_be_taken_for_a_call(engines, family):
    engine = engines[family]
    syntax = engine.tool_syntax
    grammar = syntax.grammar(FUNCTIONS, required=False, parallel=True)
    seen_text = False
    for seed in range(4):
        text = "".join(_generate(engine, grammar, seed, max_tokens=12))
        content, calls = syntax.parse(text)
        if not calls:
            seen_text = True
            assert not text.lstrip().startswith(syntax.starts) and content == text
    assert seen_text


@pytest.mark.parametrize("family", ["llama3", "mistral"])
def test_assistant_calls_and_results_render_in_the_family_syntax(engines, family):
    engine = engines[family]
    call_id = "abcDEF123"  # Mistral's template wants 9 letters and digits
    conversation = [
        *ASK,
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": call_id,
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
                }
            ],
        },
        {"role": "tool", "content": "sunny", "tool_call_id": call_id},
    ]
    text = engine.tokenizer.decode(engine.encode_chat(conversation, FUNCTIONS))
    if family == "llama3":
        assert (
            '<|end_header_id|>\n\n{"name": "get_weather", "parameters": {"city": "Paris"}}' in text
        )
        assert '<|start_header_id|>ipython<|end_header_id|>\n\n"sunny"<|eot_id|>' in text
    else:
        assert '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}' in text
        assert '[TOOL_RESULTS] {"content": sunny, "call_id": "abcDEF123"}' in text
    # What the template renders is what the family's parser reads.
    rendered = LLAMA3 if family == "llama3" else MISTRAL
    start = text.index("{" if family == "llama3" else "[TOOL_CALLS]", text.index("Paris?"))
    _, calls = rendered.parse(text[start:].split("<|eot_id|>")[0].split("</s>")[0])
    assert [(c.name, c.arguments) for c in calls] == [("get_weather", {"city": "Paris"})]


def test_mistral_parallel_calls_and_llama3_single_call():
    two = '[TOOL_CALLS] [{"name": "a", "arguments": {"x": [1, {"y": "}]"}]}}, {"name": "b", "arguments": {}}]'  # noqa: E501
    assert [(c.name, c.arguments) for c in MISTRAL.parse(two)[1]] == [
        ("a", {"x": [1, {"y": "}]"}]}),
        ("b", {}),
    ]
    streamed = ToolCallDeltas(MISTRAL)
    got = assemble([streamed.delta(two[k : k + 2]) for k in range(0, len(two), 2)])
    assert [json.loads(g["arguments"]) for g in got.values()] == [{"x": [1, {"y": "}]"}]}, {}]
    grammar = LLAMA3.grammar(FUNCTIONS, required=True, parallel=True)
    assert "calls: body\n" in grammar  # one call even when parallel calls are allowed
    assert LLAMA3.parse("It is sunny.") == ("It is sunny.", [])


def test_json_value_end_finds_where_arguments_end():
    text = '{"a": "x}\\"]", "b": [1, 2]}, rest'
    assert json_value_end(text, 0) == text.index(", rest")
    assert json_value_end('{"a": [1', 0) is None
    assert json_value_end("12, x", 0) == 2
