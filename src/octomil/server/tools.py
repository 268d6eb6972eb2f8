"""Tool calling at the HTTP edge: request fields -> engine messages, tools and call grammar;
the completion's text -> OpenAI ``tool_calls`` (whole, or as streamed deltas).

``tool_choice``: ``none`` (tools are shown, no call is made or read), ``auto`` (the default with
tools: a call or a text answer), ``required`` (at least one call), or a named function (exactly
one call to it). ``parallel_tool_calls=false`` allows one call. Calls are constrained to each
function's parameter schema (:func:`octomil.engine.tool_calls.call_grammar`).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from octomil.engine.constraint import GrammarSpec
from octomil.engine.tool_calls import CLOSE, OPEN, Function, call_grammar, parse_calls
from octomil.engine.tool_calls import ToolCall as EngineToolCall
from octomil.server.errors import APIError
from octomil.server.protocol import ChatCompletionRequest, ChatMessage, FunctionCall, ToolCall


@dataclass(frozen=True)
class ToolPlan:
    """What a chat request asks of tools: the functions shown, and whether calls are read."""

    functions: list[Function] = field(default_factory=list)
    grammar: GrammarSpec | None = None
    reads_calls: bool = False


def plan(body: ChatCompletionRequest) -> ToolPlan:
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
    grammar = call_grammar(allowed, required=required, parallel=parallel)
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


def _wire(call: EngineToolCall) -> ToolCall:
    arguments = json.dumps(call.arguments, ensure_ascii=False)
    return ToolCall(
        id=f"call_{uuid.uuid4().hex[:24]}",
        function=FunctionCall(name=call.name, arguments=arguments),
    )


def read_calls(text: str) -> tuple[str | None, list[ToolCall]]:
    """(content, tool_calls) of a finished completion."""
    content, calls = parse_calls(text)
    return content, [_wire(c) for c in calls]


class ToolCallDeltas:
    """Streaming: plain text passes through as content; once the answer is a call (it starts
    with ``<``, which a text answer may not), each call is streamed as OpenAI's deltas: index, id,
    type and name as soon as the name is written, then the arguments' JSON text as it comes.

    The call grammar writes ``<tool_call>\n{"name": "NAME", "arguments": ARGS}\n</tool_call>``;
    the end of ARGS is known only at the closing tag, so the characters that may be the outer
    ``}`` and the tag are held back until then."""

    _HEAD = re.compile(re.escape(OPEN) + r'\s*\{"name": "([^"]*)", "arguments": ')
    _TAIL = "}\n" + CLOSE

    def __init__(self) -> None:
        self.text = ""
        self.calls = 0  # calls whose header was sent
        self._is_call: bool | None = None
        self._at = 0  # where the next call's search starts
        self._args_from: int | None = None  # start of the current call's arguments
        self._sent = 0  # argument characters of the current call already sent

    def delta(self, text: str) -> dict[str, Any]:
        self.text += text
        if self._is_call is None and self.text.strip():
            self._is_call = self.text.lstrip().startswith("<")
        if not self._is_call:
            return {"content": text} if text else {}
        deltas: list[dict[str, Any]] = []
        while True:
            if self._args_from is None:
                head = self._HEAD.search(self.text, self._at)
                if head is None:
                    break
                deltas.append(
                    {
                        "index": self.calls,
                        "id": f"call_{uuid.uuid4().hex[:24]}",
                        "type": "function",
                        "function": {"name": head.group(1), "arguments": ""},
                    }
                )
                self.calls += 1
                self._args_from, self._sent = head.end(), 0
            args = self.text[self._args_from :]
            end = args.find(self._TAIL)
            done = end >= 0
            ready = args[:end] if done else args[: max(len(args) - len(self._TAIL), 0)]
            if len(ready) > self._sent:
                piece = ready[self._sent :]
                deltas.append({"index": self.calls - 1, "function": {"arguments": piece}})
                self._sent = len(ready)
            if not done:
                break
            self._at = self._args_from + end + len(self._TAIL)
            self._args_from = None
        return {"tool_calls": deltas} if deltas else {}
