"""Per-request speculative decoding: which drafter, how many tokens to draft, what was accepted.

A :class:`Speculator` belongs to one :class:`~octomil.engine.generation.Generation`. Before a
decode step it proposes up to K drafted tokens (:meth:`Speculator.propose`); the step verifies
them as extra rows (``octomil.engine.verify``); afterwards :meth:`Speculator.observe` records how
many were accepted and adapts K, capped by the request's ``num_tokens``.

Modes: ``lookup`` (prompt lookup, ``octomil.engine.lookup``) and ``model:NAME`` adapt K as Hugging
Face's assisted generation does: all accepted -> K + 2, otherwise K - 1 (at least 1). ``auto``
drafts by lookup from matches of at least two tokens, picks K from a cost model, pauses where
speculation does not pay and resumes where the answer starts copying (``octomil.engine.spec_auto``).
``off``. Counters follow vLLM's speculative-decoding metrics: drafts, draft tokens, accepted
tokens, accepted tokens per draft position.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from octomil.engine.lookup import LookupDrafter
from octomil.engine.spec_auto import AutoPolicy

if TYPE_CHECKING:
    from octomil.engine.guided_drafts import DraftGuide

MODES = ("off", "lookup", "auto")
DEFAULT_NUM_TOKENS = 8


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
        self._auto = AutoPolicy(settings.num_tokens) if auto else None
        self._drafter = drafter or LookupDrafter(tokens, min_n=2 if auto else 1)

    @property
    def active(self) -> bool:
        """Drafting now (``auto`` may pause and resume; see ``octomil.engine.spec_auto``)."""
        return self.settings.enabled and not (self._auto is not None and self._auto.paused)

    def release(self) -> None:
        """The request ended: drop the drafter (a draft model's KV cache); stats stay."""
        self._drafter = LookupDrafter([])

    def extend(self, tokens: list[int]) -> None:
        """Tokens emitted (or, first, the prompt): the text drafts are looked up in."""
        auto = self._auto
        if auto is None or not auto.paused:
            self._drafter.extend(tokens)
            return
        for token in tokens:  # paused: shadow drafts, checked as the tokens arrive
            auto.follow(token)
            self._drafter.extend([token])
            if auto.paused and not auto.shadow:
                auto.shadow = self._drafter.draft(self.settings.num_tokens)

    def propose(self, room: int, guide: DraftGuide | None = None) -> list[int]:
        """Drafts for the next step; ``room``: most tokens the step may add beyond its own;
        ``guide``: a constrained request's grammar, which the drafts must follow
        (``octomil.engine.guided_drafts``)."""
        if not self.active:
            return []
        if self._auto is not None:
            self.k = self._auto.step_k()
            if self.k == 0:
                return []
        return self._drafter.draft(min(self.k, room), guide)

    def observe(self, drafted: int, accepted: int) -> None:
        self.stats.record(drafted, accepted)
        if self._auto is not None:
            self._auto.observe(drafted, accepted)
            return
        self.k = (
            min(self.settings.num_tokens, self.k + 2) if accepted == drafted else max(1, self.k - 1)
        )
