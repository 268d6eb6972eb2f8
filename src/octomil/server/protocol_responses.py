"""Wire protocol, responses: pydantic models of the OpenAI response shapes we serve (the requests
are in :mod:`octomil.server.protocol`), with Octomil's extras (``usage.early_exit``,
``usage.speculative``) after OpenAI's fields.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel

from octomil.server.protocol import ToolCall


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
    forced_tokens: int = 0  # emitted without a model pass (a grammar's only continuation)


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
    content: str | None
    tool_calls: list[ToolCall] | None = None


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
