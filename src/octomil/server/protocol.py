"""Wire protocol: pydantic models of the OpenAI request and response shapes we serve.

Fields follow the order of OpenAI's API reference; Octomil's extras (``early_exit``) come last.
Range checks live in ``Field(...)`` so they show in the OpenAPI schema. Pydantic stays here, at the
HTTP edge: :mod:`octomil.server.serving` converts a request into engine dataclasses once.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from octomil.config import SpeedQuality

# A seed reaches the sampler as an unsigned 64-bit value; OpenAI documents the int64 range.
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


class _Request(BaseModel):
    # Unknown fields are ignored (like vLLM) so SDK calls with vendor extras still work.
    model_config = ConfigDict(extra="ignore")


class EarlyExitOverride(BaseModel):
    """Per-request early-exit control; a preset wins over a threshold, as on the CLI."""

    model_config = ConfigDict(extra="forbid")

    threshold: float | None = Field(
        None, ge=0.0, le=1.0, description="Entropy threshold (nats); lower exits less often."
    )
    speed_quality: SpeedQuality | None = Field(
        None, description="Preset: quality (0.1, 75%), balanced (0.3, 50%), fast (0.5, 25%)."
    )
    min_layers: float | None = Field(
        None, gt=0.0, le=1.0, description="Fewest layers (as a fraction) a token passes first."
    )


EarlyExitField = Annotated[
    bool | EarlyExitOverride | None,
    Field(
        description="Octomil extra: false for full depth, true for the server default, or an "
        'object such as {"threshold": 0.2} or {"speed_quality": "fast"}.'
    ),
]


class StreamOptions(BaseModel):
    include_usage: bool | None = False


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: dict[str, Any] | None = None


class TextContentPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


Stop = str | Annotated[list[str], Field(max_length=4)] | None


class _SamplingFields(_Request):
    """Sampling fields shared by both endpoints (OpenAI order)."""

    frequency_penalty: float | None = Field(0.0, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(0.0, ge=-2.0, le=2.0)
    max_tokens: int | None = Field(None, ge=1, description="Upper bound on generated tokens.")
    n: int | None = Field(1, ge=1, le=1, description="Only n=1 is supported.")
    seed: int | None = Field(None, ge=_INT64_MIN, le=_INT64_MAX)
    stop: Stop = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(1.0, ge=0.0, le=2.0)
    top_p: float | None = Field(1.0, ge=0.0, le=1.0)
    user: str | None = None

    @field_validator("frequency_penalty", "presence_penalty")
    @classmethod
    def _unsupported_penalty(cls, value: float | None) -> float | None:
        if value:
            raise ValueError("penalties are not supported yet; leave it at 0")
        return value


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1)
    model: str
    logprobs: bool | None = False
    max_completion_tokens: int | None = Field(None, ge=1)
    response_format: ResponseFormat | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    early_exit: EarlyExitField = None

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs requires logprobs=true")
        return value


class CompletionRequest(_SamplingFields):
    model: str
    prompt: str | list[int] | list[str] = Field(
        ..., description="Text, or token ids; one prompt per request."
    )
    echo: bool | None = False
    logprobs: int | None = Field(None, ge=0, le=5)
    suffix: str | None = None
    early_exit: EarlyExitField = None

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


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    early_exit: EarlyExitUsage


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
