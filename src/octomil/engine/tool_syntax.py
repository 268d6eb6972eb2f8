"""How a model writes tool calls: one syntax per chat-template family, for grammar and parser.

A model calls tools in the syntax its chat template teaches (and renders past calls in):

- ``hermes`` (Qwen2.5, Hermes, and the fallback for templates without tools)::

      <tool_call>
      {"name": "get_weather", "arguments": {"city": "Paris"}}
      </tool_call>

- ``llama3`` (Llama 3.1-3.3: the assistant message is the call itself, one call per message, as
  the template renders ``tool_calls`` and refuses more than one)::

      {"name": "get_weather", "parameters": {"city": "Paris"}}

- ``mistral`` (the ``[TOOL_CALLS]`` control token, then a JSON array; the template wants call
  ids of 9 letters and digits)::

      [TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}]

:func:`syntax_for_template` picks the family from the template's source. Each syntax gives the
Lark grammar (llguidance) of its calls, whose JSON is constrained to each function's parameter
schema; with ``tool_choice="auto"`` a text answer is allowed instead, which may not start with
the character that starts a call. :meth:`ToolSyntax.parse` reads a finished completion; streamed,
``ToolSyntax.head`` finds each call's name and :func:`json_value_end` where its arguments end.
"""

from __future__ import annotations

import json
import re
import secrets
import string
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from octomil.engine import tool_calls
from octomil.engine.tool_calls import Function, ToolCall

# Compact JSON in calls, as in response_format (small models loop on free whitespace).
_JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
MISTRAL_CALLS = "[TOOL_CALLS]"
_ALNUM = string.ascii_letters + string.digits


@dataclass(frozen=True)
class ToolSyntax:
    """One family's call syntax. ``starts``: the first character of a call (a text answer may
    not start with it); ``head``: matches a call's start up to its arguments, group 1 the name."""

    family: str
    arguments_key: str
    starts: str
    head: re.Pattern[str]
    parallel: bool  # more than one call per message can be written (and rendered back)
    # Mistral: the id of the ``[TOOL_CALLS]`` control token (llguidance matches a control token
    # only by id, ``<[ID]>``; its text as a literal would be spelled in plain bytes).
    calls_token: int | None = None

    def grammar(self, functions: list[Function], *, required: bool, parallel: bool) -> str:
        """Lark text: one call (several when ``parallel`` and the family allows it) to one of
        ``functions``; when not ``required``, a text answer instead."""
        if self.family == "hermes":
            return tool_calls.call_grammar(functions, required=required, parallel=parallel)
        body = f"body: %json {json.dumps(self._schema(functions))}"
        if self.family == "llama3":
            rules = ["calls: body", body]
        else:
            more = ' (", " body)*' if parallel and self.parallel else ""
            token = self.calls_token
            marker = json.dumps(MISTRAL_CALLS) if token is None else f"<[{token}]>"
            rules = [f'calls: {marker} " [" body{more} "]"', body]
        if required:
            return "\n".join(["start: calls", *rules])
        text = f"TEXT: /[^{re.escape(self.starts)}\\s][\\s\\S]*/"
        return "\n".join(["start: calls | TEXT", *rules, text])

    def _schema(self, functions: list[Function]) -> dict[str, Any]:
        variants = [
            {
                "type": "object",
                "properties": {
                    "name": {"const": f.name},
                    self.arguments_key: f.parameters or {"type": "object"},
                },
                "required": ["name", self.arguments_key],
                "additionalProperties": False,
            }
            for f in functions
        ]
        return {"anyOf": variants, "x-guidance": _JSON_STYLE}

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content before the calls or None, the calls) of a completion's text."""
        if self.family == "hermes":
            return tool_calls.parse_calls(text)
        if self.family == "llama3":
            at = text.find("{") if text.lstrip().startswith("{") else -1
            bodies = _json_at(text, at)
            bodies = [bodies] if isinstance(bodies, dict) else None
        else:
            at = text.find(MISTRAL_CALLS)
            bodies = _json_at(text, at + len(MISTRAL_CALLS)) if at >= 0 else None
        calls = [c for c in map(self._call, bodies if isinstance(bodies, list) else []) if c]
        if not calls:
            return text, []
        content = text[:at].strip()
        return content or None, calls

    def _call(self, body: Any) -> ToolCall | None:
        if not isinstance(body, dict) or not isinstance(body.get("name"), str):
            return None
        arguments = body.get(self.arguments_key, body.get("arguments"))
        return ToolCall(body["name"], arguments if isinstance(arguments, dict) else {})

    def new_id(self) -> str:
        """A call id: Mistral's template accepts 9 letters and digits only."""
        if self.family == "mistral":
            return "".join(secrets.choice(_ALNUM) for _ in range(9))
        return f"call_{uuid.uuid4().hex[:24]}"


def _json_at(text: str, start: int) -> Any:
    """The JSON value that starts at ``start`` (after whitespace), None if there is none."""
    if start < 0:
        return None
    try:
        return json.JSONDecoder().raw_decode(text[start:].lstrip())[0]
    except json.JSONDecodeError:
        return None


def json_value_end(text: str, start: int) -> int | None:
    """Index just after the JSON value (object, array or string) starting at ``start``, None
    while it is incomplete: the end of a call's arguments in a streamed completion."""
    depth, in_string, escaped = 0, False, False
    for i in range(start, len(text)):
        ch = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
                if depth == 0:
                    return i + 1
        elif ch == '"':
            in_string = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
        elif depth == 0 and ch in ",\n ":
            return i  # a number, true, false or null ended
    return None


HERMES = ToolSyntax(
    "hermes",
    "arguments",
    "<",
    re.compile(re.escape(tool_calls.OPEN) + r'\s*\{"name": "([^"]*)", "arguments": '),
    parallel=True,
)
LLAMA3 = ToolSyntax(
    "llama3", "parameters", "{", re.compile(r'\{"name": "([^"]*)", "parameters": '), False
)
MISTRAL = ToolSyntax(
    "mistral",
    "arguments",
    "[",
    re.compile(r'[\[,] ?\{"name": "([^"]*)", "arguments": '),
    parallel=True,
)


def syntax_for_template(
    chat_template: str | None, vocab: Mapping[str, int] | None = None
) -> ToolSyntax:
    """The call syntax a chat template teaches; Hermes' for templates without tool support (the
    fallback writes its format into the prompt, ``tool_calls.fallback_messages``). ``vocab``:
    the tokenizer's, where Mistral's ``[TOOL_CALLS]`` token is looked up."""
    source = str(chat_template or "")
    if not tool_calls.template_supports_tools(source):
        return HERMES
    if MISTRAL_CALLS in source:
        return replace(MISTRAL, calls_token=(vocab or {}).get(MISTRAL_CALLS))
    if tool_calls.OPEN in source:
        return HERMES
    if "<|start_header_id|>" in source and '"parameters"' in source:
        return LLAMA3
    return HERMES
