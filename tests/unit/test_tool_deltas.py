"""Streamed tool calls (``server.tools.ToolCallDeltas``): what the deltas add up to."""

import json

from tool_delta_assembly import assemble

from octomil.engine.tool_calls import ToolCall, render_call
from octomil.server.tools import ToolCallDeltas


def _stream(text: str, step: int) -> list[dict]:
    deltas, stream = [], ToolCallDeltas()
    for k in range(0, len(text), step):
        deltas.append(stream.delta(text[k : k + step]))
    return deltas


def test_calls_stream_name_first_then_arguments_at_any_chunking():
    calls = [ToolCall("get_weather", {"city": "Paris", "days": [1, 2]}), ToolCall("noop", {})]
    text = "\n".join(render_call(c) for c in calls)
    for step in (1, 3, 7, len(text)):
        deltas = _stream(text, step)
        got = assemble(deltas)
        assert [got[i]["name"] for i in (0, 1)] == ["get_weather", "noop"]
        assert [json.loads(got[i]["arguments"]) for i in (0, 1)] == [c.arguments for c in calls]
        assert all(got[i]["id"].startswith("call_") for i in (0, 1))
        assert not any("content" in d for d in deltas)
    # One character at a time, the arguments arrive in several pieces before the call ends.
    pieces = [c for d in _stream(text, 1) for c in d.get("tool_calls", []) if c["index"] == 0]
    assert len(pieces) > 3


def test_text_answers_pass_through():
    assert _stream("Hello there", 4) == [
        {"content": "Hell"},
        {"content": "o th"},
        {"content": "ere"},
    ]
