"""Structured-output request fields -> the engine's :class:`GrammarSpec`.

``response_format`` (OpenAI: ``json_object``, ``json_schema``) and vLLM's extras
``guided_regex``, ``guided_choice`` and ``guided_grammar`` each name one grammar; a request may
give at most one. Whether the grammar compiles is decided by the engine (llguidance), whose
error names the problem and becomes a 400 on the field that carried it.
"""

from __future__ import annotations

from octomil.engine.constraint import GrammarSpec
from octomil.server.errors import APIError
from octomil.server.protocol import ResponseFormat


def grammar_spec(
    response_format: ResponseFormat | None = None,
    guided_regex: str | None = None,
    guided_choice: list[str] | None = None,
    guided_grammar: str | None = None,
) -> GrammarSpec | None:
    specs = []
    if response_format is not None and response_format.type == "json_object":
        specs.append(GrammarSpec("json_object", None, "response_format"))
    elif response_format is not None and response_format.json_schema is not None:
        schema = response_format.json_schema.schema_
        specs.append(GrammarSpec("json_schema", schema, "response_format.json_schema.schema"))
    if guided_regex is not None:
        specs.append(GrammarSpec("regex", guided_regex, "guided_regex"))
    if guided_choice is not None:
        specs.append(GrammarSpec("choice", tuple(guided_choice), "guided_choice"))
    if guided_grammar is not None:
        specs.append(GrammarSpec("grammar", guided_grammar, "guided_grammar"))
    if len(specs) > 1:
        raise APIError(
            400,
            "give at most one of response_format (json_object/json_schema), guided_regex, "
            f"guided_choice and guided_grammar; got {', '.join(s.param for s in specs)}",
            param=specs[1].param,
            code="invalid_value",
        )
    return specs[0] if specs else None
