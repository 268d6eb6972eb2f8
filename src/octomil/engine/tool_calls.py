"""Tool calling: how tools reach the prompt, the grammar of a call, and reading calls back.

The Hermes wire format for calls, the one Qwen2.5's template (and Hermes-style prompts) teach, and
the one the fallback writes (other template families' syntaxes: ``octomil.engine.tool_syntax``)::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

Prompt: a chat template that knows tools (its source mentions ``tools``: Qwen2.5, Llama 3.x,
Mistral) renders the tool list, assistant ``tool_calls`` and ``tool`` results itself. For a template
that does not (SmolLM2's), :func:`fallback_messages` writes the same information as text: the
tool list and the call format in a system message, past calls as ``<tool_call>`` blocks in the
assistant's content, results as user turns in ``<tool_response>`` blocks.

Output: :func:`call_grammar` is a Lark grammar (llguidance) whose calls are JSON constrained to
each function's parameter schema, so every call parses and names a real function. With
``tool_choice="auto"`` the model may instead answer in text that does not start with ``<``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_CALL_RE = re.compile(re.escape(OPEN) + r"\s*(\{.*?\})\s*" + re.escape(CLOSE), re.DOTALL)
# Compact JSON in calls, as in response_format (small models loop on free whitespace).
_JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True)
class Function:
    name: str
    description: str | None
    parameters: dict[str, Any]  # a JSON Schema for the arguments object

    def as_tool(self) -> dict[str, Any]:
        """OpenAI/Hugging Face tool shape, what chat templates iterate over."""
        function: dict[str, Any] = {"name": self.name, "parameters": self.parameters}
        if self.description:
            function["description"] = self.description
        return {"type": "function", "function": function}


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]


def template_supports_tools(chat_template: str | None) -> bool:
    return bool(chat_template) and "tools" in str(chat_template)


def fallback_messages(
    messages: list[dict[str, Any]], functions: list[Function]
) -> list[dict[str, Any]]:
    """Messages for a template without tool support: tools, calls and results written as text."""
    out: list[dict[str, Any]] = []
    for m in messages:
        if m["role"] == "tool":
            text = f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"
            out.append({"role": "user", "content": text})
        elif m.get("tool_calls"):
            blocks = [
                render_call(ToolCall(c["function"]["name"], c["function"]["arguments"]))
                for c in m["tool_calls"]
            ]
            content = "\n".join([m.get("content") or "", *blocks]).strip()
            out.append({"role": "assistant", "content": content})
        else:
            out.append({"role": m["role"], "content": m.get("content") or ""})
    if functions:
        listing = "\n".join(json.dumps(f.as_tool()["function"]) for f in functions)
        system = (
            "You can call these functions (their arguments follow the JSON Schema given):\n"
            f"{listing}\n"
            f"To call one, reply with {OPEN}\n"
            '{"name": <function name>, "arguments": <arguments object>}\n'
            f"{CLOSE}\n(one block per call). Function results come back in <tool_response> "
            "blocks."
        )
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{system}"}
        else:
            out.insert(0, {"role": "system", "content": system})
    return out


def render_call(call: ToolCall) -> str:
    body = json.dumps({"name": call.name, "arguments": call.arguments}, ensure_ascii=False)
    return f"{OPEN}\n{body}\n{CLOSE}"


def call_grammar(functions: list[Function], *, required: bool, parallel: bool) -> str:
    """Lark text: one call (or several when ``parallel``) to one of ``functions``; when not
    ``required``, text that does not start with ``<`` is allowed instead."""
    variants = [
        {
            "type": "object",
            "properties": {
                "name": {"const": f.name},
                "arguments": f.parameters or {"type": "object"},
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for f in functions
    ]
    schema = {"anyOf": variants, "x-guidance": _JSON_STYLE}
    calls = 'calls: call ("\\n" call)*' if parallel else "calls: call"
    rules = [
        "start: calls" if required else "start: calls | TEXT",
        calls,
        f"call: {json.dumps(OPEN + chr(10))} body {json.dumps(chr(10) + CLOSE)}",
        f"body: %json {json.dumps(schema)}",
    ]
    if not required:
        rules.append(r"TEXT: /[^<][\s\S]*/")
    return "\n".join(rules)


def parse_calls(text: str) -> tuple[str | None, list[ToolCall]]:
    """(content before the calls or None, the calls) of a completion's text."""
    calls = []
    for match in _CALL_RE.finditer(text):
        try:
            body = json.loads(match.group(1))
        except json.JSONDecodeError:
            continue
        if isinstance(body, dict) and isinstance(body.get("name"), str):
            arguments = body.get("arguments")
            calls.append(ToolCall(body["name"], arguments if isinstance(arguments, dict) else {}))
    if not calls:
        return text, []
    content = text[: text.find(OPEN)].strip()
    return content or None, calls
