"""Tool calling at the HTTP edge: request fields -> engine messages, tools and call grammar;
the completion's text -> OpenAI ``tool_calls`` (whole, or as streamed deltas).

``tool_choice``: ``none`` (tools are shown, no call is made or read), ``auto`` (the default with
tools: a call or a text answer), ``required`` (at least one call), or a named function (exactly
one call to it). ``parallel_tool_calls=false`` allows one call. Calls are written in the syntax of
the model's chat-template family and constrained to each function's parameter schema
(:mod:`octomil.engine.tool_syntax`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from octomil.engine.constraint import GrammarSpec
from octomil.engine.tool_calls import Function
from octomil.engine.tool_calls import ToolCall as EngineToolCall
from octomil.engine.tool_syntax import HERMES, ToolSyntax, json_value_end
from octomil.server.errors import APIError
from octomil.server.protocol import ChatCompletionRequest, ChatMessage, FunctionCall, ToolCall


@dataclass(frozen=True)
class ToolPlan:
    """What a chat request asks of tools: the functions shown, and whether calls are read."""

    functions: list[Function] = field(default_factory=list)
    grammar: GrammarSpec | None = None
    reads_calls: bool = False


def plan(body: ChatCompletionRequest, syntax: ToolSyntax = HERMES) -> ToolPlan:
    functions = [
        Function(t.function.name, t.function.description, t.function.parameters or {})
        for t in body.tools or []
    ]
    names = [f.name for f in functions]
    if len(set(names)) != len(names):
        raise APIError(
            400, "tools have duplicate function names", param="tools", code="invalid_value"
        )
    if not functions and body.tool_choice not in (None, "none"):
        raise APIError(400, "tool_choice needs tools", param="tool_choice", code="invalid_value")
    choice = body.tool_choice or ("auto" if functions else "none")
    if choice == "none":
        return ToolPlan(functions)
    required, parallel, allowed = True, body.parallel_tool_calls is not False, functions
    if choice == "auto":
        required = False
    elif not isinstance(choice, str):
        allowed = [f for f in functions if f.name == choice.function.name]
        if not allowed:
            raise APIError(
                400,
                f"tool_choice names {choice.function.name!r}, which is not one of the tools "
                f"({', '.join(names)})",
                param="tool_choice",
                code="invalid_value",
            )
        parallel = False
    grammar = syntax.grammar(allowed, required=required, parallel=parallel)
    return ToolPlan(functions, GrammarSpec("grammar", grammar, "tools"), reads_calls=True)


def engine_message(i: int, m: ChatMessage) -> dict[str, Any]:
    """One request message as the engine renders it; an assistant's calls with their
    arguments as objects (what chat templates expect)."""
    role = "system" if m.role == "developer" else m.role
    out: dict[str, Any] = {"role": role, "content": m.text()}
    if m.tool_calls:
        calls = []
        for j, call in enumerate(m.tool_calls):
            try:
                arguments = json.loads(call.function.arguments)
            except json.JSONDecodeError:
                arguments = None
            if not isinstance(arguments, dict):
                raise APIError(
                    400,
                    "function arguments must be a JSON object",
                    param=f"messages.{i}.tool_calls.{j}.function.arguments",
                    code="invalid_value",
                )
            function = {"name": call.function.name, "arguments": arguments}
            calls.append({"id": call.id, "type": "function", "function": function})
        out["tool_calls"] = calls
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    return out


def _wire(call: EngineToolCall, syntax: ToolSyntax) -> ToolCall:
    arguments = json.dumps(call.arguments, ensure_ascii=False)
    return ToolCall(id=syntax.new_id(), function=FunctionCall(name=call.name, arguments=arguments))


def read_calls(text: str, syntax: ToolSyntax = HERMES) -> tuple[str | None, list[ToolCall]]:
    """(content, tool_calls) of a finished completion."""
    content, calls = syntax.parse(text)
    return content, [_wire(c, syntax) for c in calls]


class ToolCallDeltas:
    """Streaming: plain text passes through as content; once the answer is a call (it starts
    with the syntax's call character, which a text answer may not), each call is streamed as
    OpenAI's deltas: index, id, type and name as soon as the name is written, then the arguments'
    JSON text as it comes, up to where that JSON value ends (``tool_syntax.json_value_end``)."""

    def __init__(self, syntax: ToolSyntax = HERMES) -> None:
        self.syntax = syntax
        self.text = ""
        self.calls = 0  # calls whose header was sent
        self._is_call: bool | None = None
        self._at = 0  # where the next call's search starts
        self._args_from: int | None = None  # start of the current call's arguments
        self._sent = 0  # argument characters of the current call already sent

    def delta(self, text: str) -> dict[str, Any]:
        self.text += text
        if self._is_call is None and self.text.strip():
            self._is_call = self.text.lstrip().startswith(self.syntax.starts)
        if not self._is_call:
            return {"content": text} if text else {}
        deltas: list[dict[str, Any]] = []
        while True:
            if self._args_from is None:
                head = self.syntax.head.search(self.text, self._at)
                if head is None:
                    break
                deltas.append(
                    {
                        "index": self.calls,
                        "id": self.syntax.new_id(),
                        "type": "function",
                        "function": {"name": head.group(1), "arguments": ""},
                    }
                )
                self.calls += 1
                self._args_from, self._sent = head.end(), 0
            end = json_value_end(self.text, self._args_from)
            ready = self.text[self._args_from : end]
            if len(ready) > self._sent:
                piece = ready[self._sent :]
                deltas.append({"index": self.calls - 1, "function": {"arguments": piece}})
                self._sent = len(ready)
            if end is None:
                break
            self._at, self._args_from = end, None
        return {"tool_calls": deltas} if deltas else {}
