"""Wire protocol: pydantic models of the OpenAI request and response shapes we serve.

Fields follow the order of OpenAI's API reference; Octomil's extras (``early_exit``) come last.
Range checks live in ``Field(...)`` so they show in the OpenAPI schema. Pydantic stays here, at the
HTTP edge: :mod:`octomil.server.serving` converts a request into engine dataclasses once.

Requests are strict, like OpenAI's own API: a boolean is not a number and a string is not a
boolean (``Int``, ``Float``, ``Bool``); text must be valid Unicode (``Text``: a lone UTF-16
surrogate such as ``"\\ud800"`` is refused, the tokenizer cannot take it); unknown fields are
refused; and OpenAI fields that would change the answer but are not implemented (tools, logit
bias, ...) are refused unless they hold their no-op value, never silently ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.json_schema import SkipJsonSchema
from pydantic_core import PydanticCustomError

from octomil.config import SpeedQuality

# A seed reaches the sampler as an unsigned 64-bit value; OpenAI documents the int64 range.
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
MAX_STOP_SEQUENCES = 4
MAX_CHOICES = 16  # n: each choice is a sequence of the batch


def _unicode_text(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise PydanticCustomError(
            "invalid_text",
            "contains a lone UTF-16 surrogate at character {position}, which is not valid "
            "Unicode text",
            {"position": exc.start},
        ) from None
    return value


Text = Annotated[str, Strict(), AfterValidator(_unicode_text)]
Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]  # accepts JSON integers (temperature: 1), not booleans
Bool = Annotated[bool, Strict()]

# Not implemented: refused with this reason unless the value is None or one of the no-op values.
# These fields stay out of the OpenAPI schema (SkipJsonSchema): they are not part of what we serve.
UNSUPPORTED: dict[str, tuple[str, tuple[Any, ...]]] = {
    "functions": ("deprecated by OpenAI: use tools", ([],)),
    "function_call": ("deprecated by OpenAI: use tool_choice", ("none",)),
    "refusal": ("not implemented", ()),
    "audio": ("audio is not implemented", ()),
    "best_of": ("only best_of=1 is served", (1,)),
    "name": ("the chat template has no place for message names", ()),
}
Unsupported = SkipJsonSchema[Any]


def _refuse_unsupported(value: Any, info: ValidationInfo) -> Any:
    assert info.field_name is not None
    reason, noop = UNSUPPORTED[info.field_name]
    if value is None or any(value == v and type(value) is type(v) for v in noop):
        return value
    raise PydanticCustomError(
        "unsupported_parameter",
        "'{name}' is not supported: {reason}",
        {"name": info.field_name, "reason": reason},
    )


class _Request(BaseModel):
    # Unknown fields are refused, as OpenAI's API does: a misspelt or unimplemented option must
    # not be mistaken for one that took effect.
    model_config = ConfigDict(extra="forbid")


class EarlyExitOverride(BaseModel):
    """Per-request early-exit control; a preset wins over a threshold, as on the CLI."""

    model_config = ConfigDict(extra="forbid")

    threshold: Float | None = Field(
        None, ge=0.0, le=1.0, description="Entropy threshold (nats); lower exits less often."
    )
    speed_quality: SpeedQuality | None = Field(
        None, description="Preset: quality (0.1, 75%), balanced (0.3, 50%), fast (0.5, 25%)."
    )
    min_layers: Float | None = Field(
        None, gt=0.0, le=1.0, description="Fewest layers (as a fraction) a token passes first."
    )


EarlyExitField = Annotated[
    Bool | EarlyExitOverride | None,
    Field(
        description="Octomil extra: false for full depth, true for the server default, or an "
        'object such as {"threshold": 0.2} or {"speed_quality": "fast"}.'
    ),
]


TaskField = Annotated[
    Text | None,
    Field(
        max_length=64,
        description="Octomil extra: task class (code, json, chat, ...) whose early-exit preset "
        "the server's --policy-file sets; the X-Octomil-Task header does the same.",
    ),
]


class SpeculativeOverride(BaseModel):
    """Per-request speculative decoding; unset fields keep the server's settings."""

    model_config = ConfigDict(extra="forbid")

    mode: Text | None = Field(
        None,
        pattern=r"^(off|lookup|auto|model:.+)$",
        description="off, lookup (prompt lookup drafts), auto (lookup where it pays), "
        "model:NAME (a draft model the server loaded).",
    )
    num_speculative_tokens: Int | None = Field(
        None, ge=1, le=12, description="Most drafted tokens verified per step."
    )


SpeculativeField = Annotated[
    Bool | SpeculativeOverride | None,
    Field(
        description="Octomil extra: false for no speculation, true for the server default (auto "
        'when the server does not speculate), or an object such as {"mode": "lookup"}.'
    ),
]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: Bool | None = False


class JsonSchemaFormat(BaseModel):
    """``response_format.json_schema``: the output is constrained to ``schema`` (always, strict
    or not: a grammar enforces it token by token)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: Text = Field(..., max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")
    description: Text | None = None
    schema_: dict[str, Any] = Field(..., alias="schema", description="A JSON Schema object.")
    strict: Bool | None = False


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JsonSchemaFormat | None = None

    @field_validator("json_schema")
    @classmethod
    def _only_with_its_type(
        cls, value: JsonSchemaFormat | None, info: ValidationInfo
    ) -> JsonSchemaFormat | None:
        if value is not None and info.data.get("type") != "json_schema":
            raise ValueError('json_schema is only allowed with type "json_schema"')
        return value

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise PydanticCustomError(
                "missing_json_schema", 'type "json_schema" needs a json_schema object', {}
            )
        return self


# vLLM's names for constrained decoding beyond response_format (Octomil extras).
GuidedRegex = Annotated[
    Text | None, Field(description="The output matches this regular expression (vLLM extra).")
]
GuidedChoice = Annotated[
    list[Text] | None,
    Field(min_length=1, description="The output is exactly one of these strings (vLLM extra)."),
]
GuidedGrammar = Annotated[
    Text | None, Field(description="The output matches this Lark grammar (vLLM extra).")
]


class TextContentPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: Text


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Text
    arguments: Text = Field(..., description="The arguments object, as JSON text.")


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: Text
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextContentPart] | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: Text | None = None  # which call a "tool" message answers
    # What an SDK echoes back from an assistant message: accepted only as null / empty.
    name: Unsupported = None
    refusal: Unsupported = None
    audio: Unsupported = None
    function_call: Unsupported = None

    _unsupported = field_validator("name", "refusal", "audio", "function_call", mode="before")(
        _refuse_unsupported
    )

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


Stop = Annotated[
    Text | Annotated[list[Text], Field(json_schema_extra={"maxItems": MAX_STOP_SEQUENCES})] | None,
    Field(description=f"Up to {MAX_STOP_SEQUENCES} sequences where generation stops."),
]


class _SamplingFields(_Request):
    """Sampling fields shared by both endpoints (OpenAI order)."""

    frequency_penalty: Float | None = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, Annotated[Float, Field(ge=-100.0, le=100.0)]] | None = Field(
        None, description="Token id (as a string) -> bias in [-100, 100] added to its logit."
    )
    presence_penalty: Float | None = Field(0.0, ge=-2.0, le=2.0)
    max_tokens: Int | None = Field(None, ge=1, description="Upper bound on generated tokens.")
    n: Int | None = Field(
        1, ge=1, le=MAX_CHOICES, description=f"Choices to generate (at most {MAX_CHOICES})."
    )
    seed: Int | None = Field(None, ge=_INT64_MIN, le=_INT64_MAX)
    stop: Stop = None
    stream: Bool | None = False
    stream_options: StreamOptions | None = None
    temperature: Float | None = Field(1.0, ge=0.0, le=2.0)
    top_p: Float | None = Field(1.0, ge=0.0, le=1.0)
    user: Text | None = None

    @field_validator("logit_bias")
    @classmethod
    def _token_id_keys(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key in value or {}:
            if not key.isdigit():
                raise PydanticCustomError(
                    "invalid_token_id",
                    "logit_bias keys are token ids (non-negative integers), got {key!r}",
                    {"key": key},
                )
        return value

    @field_validator("stop")
    @classmethod
    def _at_most_4_stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > MAX_STOP_SEQUENCES:
            raise PydanticCustomError(
                "too_many_stop_sequences",
                "at most {limit} stop sequences are supported, got {count}",
                {"limit": MAX_STOP_SEQUENCES, "count": len(value)},
            )
        return value


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Text = Field(..., max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")
    description: Text | None = None
    parameters: dict[str, Any] | None = Field(
        None, description="JSON Schema of the arguments object; calls are constrained to it."
    )
    strict: Bool | None = False


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Text


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1)
    model: Text
    logprobs: Bool | None = False
    max_completion_tokens: Int | None = Field(None, ge=1)
    parallel_tool_calls: Bool | None = True
    response_format: ResponseFormat | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    tools: list[Tool] | None = None
    top_logprobs: Int | None = Field(None, ge=0, le=20)
    functions: Unsupported = None
    function_call: Unsupported = None
    early_exit: EarlyExitField = None
    task: TaskField = None
    speculative: SpeculativeField = None
    guided_regex: GuidedRegex = None
    guided_choice: GuidedChoice = None
    guided_grammar: GuidedGrammar = None

    _unsupported_chat = field_validator("functions", "function_call", mode="before")(
        _refuse_unsupported
    )

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs requires logprobs=true")
        return value


class CompletionRequest(_SamplingFields):
    model: Text
    prompt: Text | list[Int] | list[Text] = Field(
        ..., description="Text, or token ids; one prompt per request."
    )
    best_of: Unsupported = None
    echo: Bool | None = False
    logprobs: Int | None = Field(None, ge=0, le=5)
    suffix: Text | None = None
    early_exit: EarlyExitField = None
    task: TaskField = None
    speculative: SpeculativeField = None
    guided_regex: GuidedRegex = None
    guided_choice: GuidedChoice = None
    guided_grammar: GuidedGrammar = None

    _unsupported_completion = field_validator("best_of", mode="before")(_refuse_unsupported)

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[int] | list[str]) -> str | list[int] | list[str]:
        if isinstance(value, list):
            if not value:
                raise ValueError("prompt is empty")
            if isinstance(value[0], str) and len(value) != 1:
                raise ValueError("batched prompts are not supported: send one prompt per request")
        return value
