"""Shadow checks: how often does an early-exited token differ from the full-depth token?

An exited token's catch-up row (``engine.catch_up``) runs through the layers the token skipped
with the sequence's next step, so when it reaches the last layer its hidden state *is* the
full-depth state of that position. Applying the shared head to that row gives the token full
depth would have predicted, for the cost of one extra head row: no separate pass through the
skipped layers, and nothing the response depends on (the row's own K/V are written as always;
the extra head product is computed apart from the step's logits, so every emitted token is the
same bit for bit). The comparison is exit argmax vs full-depth argmax, as calibration measures
its disagreement budget.

Which exits are checked is decided by a per-sequence credit (``rate`` per exit), so a rate of
0.02 checks exactly every 50th exit of a sequence and tests can use 1.0 for all of them. A check
whose row never reaches the last layer (the sequence ended first) is dropped, not guessed.

Observe mode (``EarlyExitSettings.observe``, used while the drift alarm's fallback serves full
depth): the exit decision is made but not taken; the token's own row reaches the last layer in the
same step and is compared there. Every token is then full depth, and the drift alarm still sees
how the policy *would* do, so it can tell when the rate has recovered.

Invariant: shadow work reads hidden states only; it never writes the cache and never changes a
row, a product the step's tokens come from, or the order of anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx


@dataclass(frozen=True)
class ShadowResult:
    exit_layer: int  # 1-based depth the token left at
    agreed: bool  # its exit prediction equals the full-depth prediction


@dataclass
class ShadowBook:
    """One sequence's shadow checks: sampled exits waiting for their row's last layer, and
    comparisons waiting to be read (lazily evaluated, read when the next token is emitted)."""

    rate: float = 0.0
    credit: float = 0.0
    probes: dict[int, tuple[int, mx.array]] = field(default_factory=dict)  # position -> probe
    pending: list[tuple[int, mx.array]] = field(default_factory=list)  # (exit layer, agree)

    def sample(self, position: int, exit_layer: int, logits: mx.array) -> None:
        """An exit at ``position``: check it when its row reaches the last layer, maybe."""
        if self.rate <= 0.0 or position in self.probes:
            return  # observing: only a token's first would-be exit counts
        self.credit += self.rate
        if self.credit >= 1.0:
            self.credit -= 1.0
            self.probes[position] = (exit_layer, mx.argmax(logits, axis=-1).reshape(-1))

    def compare(self, positions: list[int], full_logits: mx.array) -> None:
        """``full_logits`` (len(positions), vocab): the head on these positions' last-layer rows."""
        full = mx.argmax(full_logits, axis=-1)
        for k, pos in enumerate(positions):
            exit_layer, predicted = self.probes.pop(pos)
            agree = mx.equal(full[k : k + 1], predicted)
            mx.async_eval(agree)
            self.pending.append((exit_layer, agree))

    def drain(self) -> tuple[ShadowResult, ...]:
        if not self.pending:
            return ()
        done = tuple(ShadowResult(layer, bool(agree.item())) for layer, agree in self.pending)
        self.pending.clear()
        return done

    def drop_unfinished(self) -> None:
        self.probes.clear()
