"""Plain data passed between the engine and its callers (the CLI, the server, benchmarks)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from octomil.config import EarlyExitSettings
from octomil.engine.constraint import GrammarSpec
from octomil.engine.speculation import SpeculativeSettings, SpeculativeStats


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each token and when to stop. ``temperature == 0`` is greedy."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0  # OpenAI's: minus this times each token's count in the output
    presence_penalty: float = 0.0  # OpenAI's: minus this for each token already in the output
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # None: no logprobs; k >= 0: chosen token's + top-k alternatives
    ignore_eos: bool = False
    grammar: GrammarSpec | None = None  # the output must match it (structured outputs)


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    text: str
    logprob: float


@dataclass(frozen=True)
class TokenEvent:
    """One generated token, streamed as soon as it is sampled.

    ``text`` is the new printable text (may be empty while a multi-byte character or a possible
    stop string is held back). ``finish_reason`` is set on the last event only.
    """

    token_id: int
    text: str
    layers_used: int
    entropy: float | None
    exited_early: bool
    logprob: TokenLogprob | None = None
    top_logprobs: tuple[TokenLogprob, ...] = ()
    finish_reason: str | None = None  # "stop" | "length" | None
    # Shadow checks resolved since the previous event: (exit layer, agreed with full depth).
    shadow: tuple[tuple[int, bool], ...] = ()
    forced: bool = False  # the grammar's only continuation, emitted without a model pass


@dataclass
class GenerationStats:
    """Aggregates of one request; filled as tokens are produced."""

    total_layers: int
    prompt_tokens: int = 0
    completion_tokens: int = 0
    early_exit_tokens: int = 0
    forced_tokens: int = 0  # emitted without a model pass (grammar fast-forward)
    layers_used: list[int] = field(default_factory=list)
    entropies: list[float] = field(default_factory=list)
    time_to_first_token_s: float = 0.0
    decode_time_s: float = 0.0
    prefill_time_s: float = 0.0
    finish_reason: str | None = None
    speculative: SpeculativeStats | None = None  # None: the request did not speculate

    @property
    def avg_layers_used(self) -> float:
        return sum(self.layers_used) / len(self.layers_used) if self.layers_used else 0.0

    @property
    def min_layers_used(self) -> int:
        return min(self.layers_used) if self.layers_used else 0

    @property
    def max_layers_used(self) -> int:
        return max(self.layers_used) if self.layers_used else 0

    @property
    def exit_percentage(self) -> float:
        n = len(self.layers_used)
        return 100.0 * self.early_exit_tokens / n if n else 0.0

    @property
    def avg_entropy(self) -> float | None:
        return sum(self.entropies) / len(self.entropies) if self.entropies else None

    @property
    def decode_tokens_per_s(self) -> float:
        # The first token comes from prefill; decode speed counts the tokens after it.
        n = self.completion_tokens - 1
        return n / self.decode_time_s if n > 0 and self.decode_time_s > 0 else 0.0

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_time_s if self.prefill_time_s > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "early_exit_tokens": self.early_exit_tokens,
            "forced_tokens": self.forced_tokens,
            "exit_percentage": round(self.exit_percentage, 2),
            "avg_layers_used": round(self.avg_layers_used, 3),
            "min_layers_used": self.min_layers_used,
            "max_layers_used": self.max_layers_used,
            "avg_entropy": None if self.avg_entropy is None else round(self.avg_entropy, 4),
            "total_layers": self.total_layers,
            "time_to_first_token_s": round(self.time_to_first_token_s, 4),
            "prefill_tokens_per_s": round(self.prefill_tokens_per_s, 2),
            "decode_tokens_per_s": round(self.decode_tokens_per_s, 2),
            "finish_reason": self.finish_reason,
        } | ({} if self.speculative is None else {"speculative": self.speculative.as_dict()})


@dataclass(frozen=True)
class GenerationRequest:
    """A tokenized prompt plus how to decode it."""

    prompt_tokens: tuple[int, ...]
    sampling: SamplingParams = SamplingParams()
    early_exit: EarlyExitSettings | None = None  # None: the engine's configured default
    speculative: SpeculativeSettings | None = None  # None: the engine's configured default


@dataclass(frozen=True)
class EffectiveEarlyExit:
    """What the default early-exit settings actually do on this machine: the depths where a
    token is checked for an exit. Settings can be enabled while the exit policy places no check
    (none pays on this CPU): then decoding is full depth and ``why_full_depth`` says why."""

    settings: EarlyExitSettings
    exit_layers: tuple[int, ...] = ()
    why_full_depth: str = ""

    @property
    def active(self) -> bool:
        return bool(self.exit_layers)

    def describe(self) -> str:
        """``Enabled: threshold=0.3, min_layers=50%, checks after layers 15, 18, 22``, or
        ``Enabled: ... — policy: no check pays on this machine, serving full depth``."""
        text = self.settings.describe()
        if not self.settings.enabled:
            return text
        if self.active:
            return f"{text}, checks after layers {', '.join(map(str, self.exit_layers))}"
        return f"{text} — {self.why_full_depth}, serving full depth"
