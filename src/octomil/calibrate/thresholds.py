"""Where to check for exits: placement by measured expected saving under a disagreement budget.

A preset keeps its documented threshold and minimum depth (the user-facing scale: entropy in nats
of the adapted distribution). Calibration decides *where* it checks, per decision method, by
replaying held-out tokens through every subset of the candidate depths allowed to the preset:

- a token walks the chosen depths in order; at each it pays the gate (``probe``/``lowrank``), and
  the head check when the gate passes (always, for ``entropy``); it exits at the first depth whose
  adapted entropy is <= threshold;
- an exit at depth d saves ``exit_saving(d)`` (layers skipped, net of the catch-up row that runs
  them in the next step; measured on this machine), a check that does not exit is pure cost, and
  having any check costs ``pipeline`` per token (syncs; the next step cannot be queued early);
- disagreement = share of tokens that exit with a top-1 other than the full-depth one.

The placement with the largest expected saving within the budget wins; if no placement saves at
least ``min_gain`` of a full-depth token, the preset checks nowhere (full depth: never slower).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from octomil.engine.exit_adapters import LOG_EPS

# Gate slack grid (nats of log-entropy) searched for gated methods.
MARGINS = (-0.5, -0.25, 0.0, 0.25, 0.5, 1.0, 1.5, 2.0)
# Checks are placed only if they save at least this share of a full-depth token (model error).
MIN_GAIN = 0.01


@dataclass(frozen=True)
class Costs:
    """Milliseconds, measured in the real layer loop on this machine."""

    full_token: float  # one full-depth decode step
    pipeline: float  # per token, for having any check (syncs; no queuing the next step early)
    head_check: float  # extra cost of a head + entropy check that does not exit
    gate: dict[str, float]  # extra cost of a gate that does not pass, per method
    exit_per_layer: float  # net saving per skipped layer (layer minus its catch-up row)
    exit_fixed: float  # fixed part of an exit's saving (may be negative: sync, pending rows)

    def exit_saving(self, depth: int, total_layers: int) -> float:
        return self.exit_per_layer * (total_layers - depth) + self.exit_fixed

    def to_json(self) -> dict[str, float]:
        out = {
            "full_token": self.full_token,
            "pipeline": self.pipeline,
            "head_check": self.head_check,
            "exit_per_layer": self.exit_per_layer,
            "exit_fixed": self.exit_fixed,
        }
        out.update({f"gate_{k}": v for k, v in self.gate.items()})
        return {k: round(v, 4) for k, v in out.items()}


@dataclass(frozen=True)
class Replay:
    """Held-out per-token measurements at each candidate depth (arrays of length T)."""

    entropy: dict[int, np.ndarray]
    agree: dict[int, np.ndarray]
    gate_score: dict[str, dict[int, np.ndarray]]  # method -> depth -> predicted log-entropy
    total_layers: int


@dataclass(frozen=True)
class Outcome:
    method: str
    layers: tuple[int, ...]
    margin: float
    disagreement: float
    avg_layers: float
    exit_share: float
    heads_per_token: float  # head evaluations per token, including the final one
    expected_speedup: float
    saving_ms: float

    def to_json(self) -> dict:
        return {
            "method": self.method,
            "layers": list(self.layers),
            "margin": self.margin,
            "disagreement": round(self.disagreement, 5),
            "avg_layers": round(self.avg_layers, 3),
            "exit_share": round(self.exit_share, 4),
            "heads_per_token": round(self.heads_per_token, 3),
            "expected_speedup": round(self.expected_speedup, 4),
            "saving_ms": round(self.saving_ms, 3),
        }


def simulate(
    replay: Replay,
    costs: Costs,
    method: str,
    layers: tuple[int, ...],
    threshold: float,
    margin: float,
) -> Outcome:
    """Replay the tokens through checks at ``layers`` (sorted) with one decision method."""
    n = len(next(iter(replay.entropy.values())))
    N = replay.total_layers
    alive = np.ones(n, dtype=bool)
    depth = np.full(n, N, dtype=np.float64)
    cost = np.zeros(n)
    heads = np.zeros(n)
    wrong = np.zeros(n, dtype=bool)
    bound = math.log(max(threshold, LOG_EPS)) + margin
    gate_cost = costs.gate.get(method, 0.0)
    for d in layers:
        if method == "entropy":
            passes = alive.copy()
        else:
            cost += alive * gate_cost
            passes = alive & (replay.gate_score[method][d] <= bound)
        exits = passes & (replay.entropy[d] <= threshold)
        # A check that does not exit costs the head; an exit's head replaces the final one.
        cost += (passes & ~exits) * costs.head_check
        cost -= exits * costs.exit_saving(d, N)
        heads += passes
        wrong |= exits & ~replay.agree[d]
        depth[exits] = d
        alive &= ~exits
    heads += alive  # the final head
    mean_cost = float(cost.mean()) + (costs.pipeline if layers else 0.0)
    return Outcome(
        method=method,
        layers=tuple(layers),
        margin=margin if method != "entropy" else 0.0,
        disagreement=float(wrong.mean()),
        avg_layers=float(depth.mean()),
        exit_share=float((~alive).mean()),
        heads_per_token=float(heads.mean()),
        expected_speedup=costs.full_token / max(costs.full_token + mean_cost, 1e-9),
        saving_ms=-mean_cost,
    )


def best_placement(
    replay: Replay,
    costs: Costs,
    method: str,
    candidates: tuple[int, ...],
    threshold: float,
    min_layers: int,
    budget: float,
    min_gain: float = MIN_GAIN,
) -> tuple[Outcome, Outcome]:
    """(fastest placement within budget, or none when it saves < ``min_gain``; the placement
    within budget that uses the fewest layers, whatever it costs: the quality/depth frontier)."""
    allowed = tuple(d for d in sorted(candidates) if min_layers <= d < replay.total_layers)
    margins = (0.0,) if method == "entropy" else MARGINS
    none = simulate(replay, costs, method, (), threshold, 0.0)
    best, fewest = none, none
    for k in range(1, len(allowed) + 1):
        for layers in itertools.combinations(allowed, k):
            for margin in margins:
                out = simulate(replay, costs, method, layers, threshold, margin)
                if out.disagreement > budget:
                    continue
                if out.saving_ms > best.saving_ms:
                    best = out
                if (out.avg_layers, -out.saving_ms) < (fewest.avg_layers, -fewest.saving_ms):
                    fewest = out
    if best.saving_ms < min_gain * costs.full_token:
        best = none
    return best, fewest
