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

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    ValidationInfo,
    field_validator,
)
from pydantic.json_schema import SkipJsonSchema
from pydantic_core import PydanticCustomError

from octomil.config import SpeedQuality

# A seed reaches the sampler as an unsigned 64-bit value; OpenAI documents the int64 range.
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
MAX_STOP_SEQUENCES = 4


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
    "tools": ("tool calling is not implemented yet", ([],)),
    "tool_choice": ("tool calling is not implemented yet", ("none",)),
    "functions": ("function calling is not implemented yet", ([],)),
    "function_call": ("function calling is not implemented yet", ("none",)),
    "tool_calls": ("tool calling is not implemented yet", ([],)),
    "refusal": ("not implemented", ()),
    "audio": ("audio is not implemented", ()),
    "logit_bias": ("not implemented yet", ({},)),
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


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: dict[str, Any] | None = None


class TextContentPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextContentPart] | None = None
    # What an SDK echoes back from an assistant message: accepted only as null / empty.
    name: Unsupported = None
    refusal: Unsupported = None
    audio: Unsupported = None
    tool_calls: Unsupported = None
    function_call: Unsupported = None

    _unsupported = field_validator(
        "name", "refusal", "audio", "tool_calls", "function_call", mode="before"
    )(_refuse_unsupported)

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
    logit_bias: Unsupported = None
    presence_penalty: Float | None = Field(0.0, ge=-2.0, le=2.0)
    max_tokens: Int | None = Field(None, ge=1, description="Upper bound on generated tokens.")
    n: Int | None = Field(1, ge=1, le=1, description="Only n=1 is supported.")
    seed: Int | None = Field(None, ge=_INT64_MIN, le=_INT64_MAX)
    stop: Stop = None
    stream: Bool | None = False
    stream_options: StreamOptions | None = None
    temperature: Float | None = Field(1.0, ge=0.0, le=2.0)
    top_p: Float | None = Field(1.0, ge=0.0, le=1.0)
    user: Text | None = None

    _unsupported = field_validator("logit_bias", mode="before")(_refuse_unsupported)

    @field_validator("frequency_penalty", "presence_penalty")
    @classmethod
    def _unsupported_penalty(cls, value: float | None) -> float | None:
        if value:
            raise ValueError("penalties are not supported yet; leave it at 0")
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


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1)
    model: Text
    logprobs: Bool | None = False
    max_completion_tokens: Int | None = Field(None, ge=1)
    response_format: ResponseFormat | None = None
    top_logprobs: Int | None = Field(None, ge=0, le=20)
    tools: Unsupported = None
    tool_choice: Unsupported = None
    functions: Unsupported = None
    function_call: Unsupported = None
    early_exit: EarlyExitField = None
    task: TaskField = None
    speculative: SpeculativeField = None

    _unsupported_chat = field_validator(
        "tools", "tool_choice", "functions", "function_call", mode="before"
    )(_refuse_unsupported)

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


# ---------------------------------------------------------------------------------- responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class EarlyExitUsage(BaseModel):
    early_exit_tokens: int
    exit_percentage: float
    avg_layers_used: float
    min_layers_used: int
    max_layers_used: int
    avg_entropy: float | None
    total_layers: int


class SpeculativeUsage(BaseModel):
    """Speculative decoding of one request (vLLM's counters); absent when it did not speculate."""

    drafts: int
    draft_tokens: int
    accepted_tokens: int
    acceptance_rate: float
    mean_accepted_per_step: float
    accepted_per_position: list[int]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    early_exit: EarlyExitUsage
    speculative: SpeculativeUsage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "octomil"
    total_layers: int
    context_length: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail
