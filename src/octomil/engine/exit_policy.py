"""When a token may leave the layer stack: entropy threshold, minimum depth, checked layers.

Each check evaluates the shared head (final norm + LM head) on the token's hidden state, which on
the embedded model costs about as much as 6-8 decoder layers (BRIEF). So checks happen only at a
few *candidate exit layers*, never at every layer, and never at the last layer (the final logits
are computed there anyway).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import mlx.core as mx

from octomil.config import EarlyExitSettings
from octomil.kernels import decode
from octomil.models.anatomy import Anatomy

# Candidate exits spread over [min_layers, total_layers): each one costs a head evaluation.
DEFAULT_EXIT_POINTS = 3


def entropy_nats(logits: mx.array) -> mx.array:
    """Shannon entropy (nats) of softmax(logits) over the last axis; tokens masked to -inf (a
    grammar's disallowed ones) count as probability 0."""
    return decode.entropy(logits)


def default_exit_layers(
    total_layers: int,
    min_layers: int,
    head_cost_layers: float = 0.0,
    points: int = DEFAULT_EXIT_POINTS,
) -> tuple[int, ...]:
    """Up to ``points`` depths, evenly spaced, where an exit can pay for its check.

    An exit after depth ``d`` saves ``total_layers - d`` layers, and every check costs a head
    evaluation worth ``head_cost_layers`` layers; depths whose saving cannot exceed that cost are
    never candidates (so the last layer never is). May be empty: then no check can pay and
    decoding stays full depth.
    """
    last = min(total_layers - 1, math.floor(total_layers - head_cost_layers - 1e-9))
    if min_layers > last:
        return ()
    if points <= 1 or last == min_layers:
        return (min_layers,)
    step = (last - min_layers) / (points - 1)
    return tuple(sorted({round(min_layers + i * step) for i in range(points)}))


@dataclass(frozen=True)
class ExitDecision:
    exit: bool
    logits: mx.array | None  # (1, vocab) when the head was evaluated; reused for the emitted token
    entropy: float | None


@dataclass(frozen=True)
class ExitPolicy:
    """Resolved for one model: exit after layer ``d`` (1-based depth) iff ``d in exit_layers``
    and the entropy there is at most ``threshold``."""

    threshold: float
    min_layers: int
    exit_layers: tuple[int, ...]
    total_layers: int
    # (vocab,) bool: a row whose exit prediction is one of these tokens stays (token_classes).
    never_exit: mx.array | None = field(default=None, compare=False, repr=False)
    observe: bool = False  # decide, never leave (engine.shadow)

    @classmethod
    def from_settings(
        cls,
        settings: EarlyExitSettings,
        total_layers: int,
        exit_layers: tuple[int, ...] | None = None,
        head_cost_layers: float = 0.0,
    ) -> ExitPolicy | None:
        """``exit_layers`` given by the user are kept (within range); else cost-aware defaults."""
        if not settings.enabled:
            return None
        min_layers = settings.min_layers(total_layers)
        if exit_layers is None:
            layers = default_exit_layers(total_layers, min_layers, head_cost_layers)
        else:
            layers = tuple(sorted(d for d in set(exit_layers) if min_layers <= d < total_layers))
        assert settings.threshold is not None
        return cls(settings.threshold, min_layers, layers, total_layers)

    def checks_after(self, depth: int) -> bool:
        return depth in self.exit_layers

    def decide(self, anatomy: Anatomy, hidden: mx.array, depth: int) -> ExitDecision:
        """Should the token whose hidden state after ``depth`` layers is ``hidden`` (1, D) exit?"""
        return self.decide_rows(anatomy, hidden, depth)[0]

    def decide_rows(
        self, anatomy: Anatomy, hidden: mx.array, depth: int, masks: mx.array | None = None
    ) -> list[ExitDecision]:
        """:meth:`decide` for the rows of ``hidden`` (B, D) of sequences sharing this policy: one
        head product and one synchronisation for all of them, each row decided on its own.
        ``masks`` (B, vocab) bool: each row's allowed tokens (a grammar's); the entropy and the
        returned logits are those of the masked distribution."""
        return _entropy_decisions(anatomy.logits(hidden), self.threshold, masks)


def _entropy_decisions(
    logits: mx.array, threshold: float, masks: mx.array | None = None
) -> list[ExitDecision]:
    """Exit decisions from the head's logits (B, vocab), one per row, over the allowed tokens."""
    if masks is not None:
        logits = mx.where(masks, logits, mx.array(-mx.inf, dtype=logits.dtype))
    ent = entropy_nats(logits)
    mx.eval(logits, ent)
    return [
        ExitDecision(value <= threshold, logits[k : k + 1], value)
        for k, value in enumerate(ent.tolist())
    ]
