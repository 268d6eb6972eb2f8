"""What a check and an exit cost on *this* machine, measured in the real layer loop.

Every figure is the difference between decode steps of the engine's own ``LayerLoop`` that differ in
one thing (a check that does not exit, a gate that does not pass, an exit at depth d followed by the
full-depth step that runs its catch-up row), so graph breaks, syncs and pending rows are counted as
they occur in serving. Configurations alternate step by step and each figure is a low percentile
of many repetitions, so load spikes from other processes hit all alike.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from octomil.calibrate.thresholds import Costs
from octomil.engine.exit_adapters import AdaptedExitPolicy
from octomil.engine.exit_policy import ExitDecision, ExitPolicy
from octomil.engine.layer_loop import LayerLoop
from octomil.models.anatomy import Anatomy

PERCENTILE = 20  # of per-step times; low percentiles resist interference from other processes


@dataclass(frozen=True)
class _Forced(ExitPolicy):
    """Checks at ``exit_layers`` with ``inner``'s decision machinery, then forces the outcome."""

    inner: AdaptedExitPolicy | None = None
    mode: str = "head"  # "head": evaluate head, no exit | "gate": gate only | "exit": head, exit

    def decide(self, anatomy: Anatomy, hidden: mx.array, depth: int) -> ExitDecision:
        assert self.inner is not None
        adapter = self.inner.adapters.get(depth)
        h = adapter(hidden) if adapter is not None else hidden
        if self.mode == "gate":
            score = self.inner.gate_score(anatomy, h, depth)
            assert score is not None
            score.item()
            return ExitDecision(False, None, None)
        decision = AdaptedExitPolicy.decide(self.inner, anatomy, hidden, depth)
        return ExitDecision(self.mode == "exit", decision.logits, decision.entropy)


def measure_costs(
    anatomy: Anatomy,
    model,
    prompt: list[int],
    make_policy: Callable[[str], AdaptedExitPolicy],
    check_depth: int,
    exit_depths: tuple[int, int],
    repeats: int = 12,
    progress: Callable[[int], None] | None = None,
) -> Costs:
    """Costs for :mod:`octomil.calibrate.thresholds`; ``make_policy(method)`` gives a policy whose
    adapters/gates are the trained ones."""
    N = anatomy.num_layers
    entropy_policy = make_policy("entropy")
    configs: dict[str, tuple[ExitPolicy | None, ...]] = {
        "full": (None, None),
        "head": (_Forced(0.0, 1, (check_depth,), N, inner=entropy_policy, mode="head"), None),
    }
    for method in ("probe", "lowrank"):
        configs[f"gate_{method}"] = (
            _Forced(0.0, 1, (check_depth,), N, inner=make_policy(method), mode="gate"),
            None,
        )
    for d in exit_depths:
        # An exit, then the full-depth step that carries its catch-up row.
        configs[f"exit_{d}"] = (_Forced(0.0, 1, (d,), N, inner=entropy_policy, mode="exit"), None)

    loop = LayerLoop(anatomy, model)
    logits = loop.prefill(prompt)
    token = int(mx.argmax(logits, axis=-1).item())
    times: dict[str, list[float]] = {k: [] for k in configs}
    names = list(configs)
    for r in range(repeats + 1):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            start = time.perf_counter()
            for policy in configs[name]:
                step = loop.decode(token, policy)
                token = int(mx.argmax(step.logits, axis=-1).item())
            if r > 0:  # the first round warms up
                times[name].append((time.perf_counter() - start) * 1000)
            if loop.position > 400:  # keep the context (and attention cost) roughly constant
                loop = LayerLoop(anatomy, model)
                token = int(mx.argmax(loop.prefill(prompt), axis=-1).item())
        if progress is not None:
            progress(1)
    t = {k: float(np.percentile(v, PERCENTILE)) for k, v in times.items()}
    full = t["full"] / 2  # every configuration runs two steps
    savings = {d: t["full"] - t[f"exit_{d}"] for d in exit_depths}
    (d1, s1), (d2, s2) = sorted(savings.items())
    per_layer = (s1 - s2) / (d2 - d1) if d2 != d1 else s1 / max(N - d1, 1)
    fixed = s1 - per_layer * (N - d1)
    return Costs(
        full_token=full,
        head_check=max(t["head"] - t["full"], 0.0),
        gate={m: max(t[f"gate_{m}"] - t["full"], 0.0) for m in ("probe", "lowrank")},
        exit_per_layer=per_layer,
        exit_fixed=fixed,
    )
