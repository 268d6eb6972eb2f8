"""Per-request speculative decoding: which drafter, how many tokens to draft, what was accepted.

A :class:`Speculator` belongs to one :class:`~octomil.engine.generation.Generation`. Before a
decode step it proposes up to K drafted tokens (:meth:`Speculator.propose`); the step verifies
them as extra rows (``octomil.engine.verify``); afterwards :meth:`Speculator.observe` records how
many were accepted and adapts K, capped by the request's ``num_tokens``.

Modes: ``lookup`` (prompt lookup, ``octomil.engine.lookup``) and ``model:NAME`` adapt K as Hugging
Face's assisted generation does: all accepted -> K + 2, otherwise K - 1 (at least 1). ``auto``
drafts by lookup from matches of at least two tokens and picks K from a cost model: with a
per-token acceptance a (the request's own, estimated as accepted / (accepted + rejections) with
one pseudo-count each) a draft of k tokens yields (1 - a^(k+1)) / (1 - a) tokens for a
verification costing 1 + ROW_COST * k single steps; K maximises the ratio, and no draft is made
while the best ratio is below 1. After AUTO_WARMUP drafts a request whose best ratio is below 1
stops speculating for good and decodes as without speculation (its steps run ahead again).
``off``. Counters follow vLLM's
speculative-decoding metrics: drafts, draft tokens, accepted tokens, accepted tokens per draft
position.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from octomil.engine.lookup import LookupDrafter

if TYPE_CHECKING:
    from octomil.engine.guided_drafts import DraftGuide

MODES = ("off", "lookup", "auto")
DEFAULT_NUM_TOKENS = 8
# A verification of r rows costs about 1 + ROW_COST * (r - 1) single steps on the embedded model
# (benchmarks/spec_bench.py, verification_cost_vs_one_row: 2 / 3 / 5 / 9 rows = 1.16 / 1.36 /
# 1.62 / 2.59 steps on two busy cores).
ROW_COST = 0.18
AUTO_WARMUP = 4


def expected_gain(acceptance: float, k: int, row_cost: float = ROW_COST) -> float:
    """Tokens per single-step cost of verifying k drafts accepted each with ``acceptance``."""
    tokens = float(k + 1) if acceptance >= 1.0 else (1 - acceptance ** (k + 1)) / (1 - acceptance)
    return tokens / (1.0 + row_cost * k)


@dataclass(frozen=True)
class SpeculativeSettings:
    mode: str = "off"  # one of MODES, or "model:NAME" (a draft model)
    num_tokens: int = DEFAULT_NUM_TOKENS  # cap on drafted tokens per step

    def __post_init__(self) -> None:
        if self.mode not in MODES and not self.draft_model:
            raise ValueError(f"speculative mode must be one of {MODES} or model:NAME")
        if self.num_tokens < 1:
            raise ValueError("num_speculative_tokens must be >= 1")

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    @property
    def draft_model(self) -> str | None:
        """NAME of ``model:NAME``, else None."""
        name = self.mode.removeprefix("model:")
        return name if name != self.mode and name else None

    def describe(self) -> str:
        """``Enabled: mode=lookup, num_speculative_tokens=8`` or ``Disabled``."""
        if not self.enabled:
            return "Disabled"
        return f"Enabled: mode={self.mode}, num_speculative_tokens={self.num_tokens}"


@dataclass
class SpeculativeStats:
    """vLLM-style counters of one request (or summed over requests)."""

    drafts: int = 0  # verification steps that carried at least one drafted token
    draft_tokens: int = 0
    accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)  # [j]: drafts accepted at j

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0

    @property
    def mean_accepted_per_step(self) -> float:
        """Tokens a verification step yields: accepted drafts + the model's own next token."""
        return 1.0 + self.accepted_tokens / self.drafts if self.drafts else 0.0

    def record(self, drafted: int, accepted: int) -> None:
        self.drafts += 1
        self.draft_tokens += drafted
        self.accepted_tokens += accepted
        while len(self.accepted_per_position) < drafted:
            self.accepted_per_position.append(0)
        for j in range(accepted):
            self.accepted_per_position[j] += 1

    def as_dict(self) -> dict[str, float | int | list[int]]:
        return {
            "drafts": self.drafts,
            "draft_tokens": self.draft_tokens,
            "accepted_tokens": self.accepted_tokens,
            "acceptance_rate": round(self.acceptance_rate, 4),
            "mean_accepted_per_step": round(self.mean_accepted_per_step, 4),
            "accepted_per_position": list(self.accepted_per_position),
        }


class Drafter(Protocol):
    def extend(self, tokens: list[int]) -> None: ...
    def draft(self, k: int, guide: DraftGuide | None = None) -> list[int]: ...


class Speculator:
    def __init__(
        self, settings: SpeculativeSettings, tokens: list[int], drafter: Drafter | None = None
    ) -> None:
        self.settings = settings
        self.stats = SpeculativeStats()
        auto = settings.mode == "auto"
        self.k = min(settings.num_tokens, 2 if auto else 4)
        self.active = settings.enabled
        self._drafter = drafter or LookupDrafter(tokens, min_n=2 if auto else 1)
        self._rejections = 0  # drafts not accepted in full (one rejected token each)

    def extend(self, tokens: list[int]) -> None:
        """Tokens emitted (or, first, the prompt): the text drafts are looked up in."""
        self._drafter.extend(tokens)

    def propose(self, room: int, guide: DraftGuide | None = None) -> list[int]:
        """Drafts for the next step; ``room``: most tokens the step may add beyond its own;
        ``guide``: a constrained request's grammar, which the drafts must follow
        (``octomil.engine.guided_drafts``)."""
        if not self.active:
            return []
        if self.settings.mode == "auto":
            self.k = self._best_k()
            if self.k == 0:
                return []
        return self._drafter.draft(min(self.k, room), guide)

    def _best_k(self) -> int:
        """auto: the draft length with the best expected tokens per cost, 0 when none pays."""
        accepted = self.stats.accepted_tokens
        a = (accepted + 1) / (accepted + self._rejections + 2)
        gains = {k: expected_gain(a, k) for k in range(1, self.settings.num_tokens + 1)}
        best = max(gains, key=gains.__getitem__)
        return best if gains[best] > 1.0 else 0

    def observe(self, drafted: int, accepted: int) -> None:
        self.stats.record(drafted, accepted)
        self._rejections += int(accepted < drafted)
        if self.settings.mode == "auto":
            if self.stats.drafts >= AUTO_WARMUP and self._best_k() == 0:
                self.active = False
            return
        self.k = (
            min(self.settings.num_tokens, self.k + 2) if accepted == drafted else max(1, self.k - 1)
        )
