"""What checks and exits cost on *this* machine, measured through the engine's own decode path.

Each figure is the difference in decode time per token between greedy generations (the engine's
``Generation`` over its ``LayerLoop``) that differ in one thing, so graph breaks, syncs, lost
run-ahead and catch-up rows are counted as they occur in serving:

- ``full``: no exit policy;
- ``idle``: a policy that checks at one depth but decides nothing (the cost of having checks at
  all, e.g. the decoder can no longer queue the next step before reading the token);
- ``gate_<method>`` / ``head``: a gate that never passes / a head + entropy check that never exits;
- ``exit_<d>``: every other token exits at depth ``d``, the next one runs full depth with its
  catch-up row (per exit: the layers skipped, net of the catch-up row and the exit's own head).

Configurations alternate and each figure is a low percentile over repetitions, so load spikes from
other processes hit all alike.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from octomil.calibrate.thresholds import Costs
from octomil.engine.exit_adapters import AdaptedExitPolicy
from octomil.engine.exit_policy import ExitDecision, ExitPolicy
from octomil.engine.generation import Generation
from octomil.engine.layer_loop import LayerLoop
from octomil.engine.types import SamplingParams
from octomil.models.anatomy import Anatomy

PERCENTILE = 25  # of per-run times; low percentiles resist interference from other processes
TOKENS = 16  # per timed generation


@dataclass(frozen=True)
class _Forced(ExitPolicy):
    """Checks at ``exit_layers`` with ``inner``'s machinery, then forces the outcome."""

    inner: AdaptedExitPolicy | None = None
    mode: str = "idle"  # idle | gate | head | exit (every other check)
    calls: list[int] = field(default_factory=lambda: [0], compare=False)

    def decide(self, anatomy: Anatomy, hidden, depth: int) -> ExitDecision:
        assert self.inner is not None
        self.calls[0] += 1
        if self.mode == "idle" or (self.mode == "exit" and self.calls[0] % 2 == 0):
            return ExitDecision(False, None, None)
        if self.mode == "gate":
            adapter = self.inner.adapters.get(depth)
            score = self.inner.gate_score(anatomy, adapter(hidden) if adapter else hidden, depth)
            assert score is not None
            score.item()
            return ExitDecision(False, None, None)
        decision = AdaptedExitPolicy.decide(self.inner, anatomy, hidden, depth)
        return ExitDecision(self.mode == "exit", decision.logits, decision.entropy)

    def decide_rows(self, anatomy: Anatomy, hidden, depth: int) -> list[ExitDecision]:
        return [self.decide(anatomy, hidden[k : k + 1], depth) for k in range(hidden.shape[0])]


def measure_costs(
    loaded,
    prompt: list[int],
    make_policy: Callable[[str], AdaptedExitPolicy],
    check_depth: int,
    exit_depths: tuple[int, int],
    repeats: int = 5,
    progress: Callable[[int], None] | None = None,
) -> Costs:
    """Costs for :mod:`octomil.calibrate.thresholds`; ``make_policy(method)`` gives a policy whose
    adapters and gates are the trained ones."""
    anatomy = loaded.anatomy
    N = anatomy.num_layers
    entropy = make_policy("entropy")

    def forced(mode: str, depth: int, inner: AdaptedExitPolicy = entropy):
        return lambda: _Forced(0.0, 1, (depth,), N, inner=inner, mode=mode)

    configs: dict[str, Callable[[], ExitPolicy | None]] = {
        "full": lambda: None,
        "idle": forced("idle", check_depth),
        "head": forced("head", check_depth),
        "gate_probe": forced("gate", check_depth, make_policy("probe")),
        "gate_lowrank": forced("gate", check_depth, make_policy("lowrank")),
    }
    for d in exit_depths:
        configs[f"exit_{d}"] = forced("exit", d)
    vocab = int(getattr(loaded.model.args, "vocab_size", 0) or len(loaded.tokenizer))

    def per_token_ms(policy: ExitPolicy | None) -> float:
        gen = Generation(
            LayerLoop(anatomy, loaded.model),
            prompt,
            SamplingParams(max_tokens=TOKENS, ignore_eos=True),
            policy,
            loaded.tokenizer,
            loaded.eos_token_ids,
            vocab,
        )
        for _ in gen:
            pass
        return 1000 * gen.stats.decode_time_s / max(gen.stats.completion_tokens - 1, 1)

    names = list(configs)
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(repeats + 1):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t = per_token_ms(configs[name]())
            if r > 0:  # the first round warms up
                times[name].append(t)
        if progress is not None:
            progress(1)
    t = {k: float(np.percentile(v, PERCENTILE)) for k, v in times.items()}
    # Every other token exits: per exit, two tokens' worth of difference.
    savings = {d: 2 * (t["idle"] - t[f"exit_{d}"]) for d in exit_depths}
    (d1, s1), (d2, s2) = sorted(savings.items())
    per_layer = (s1 - s2) / (d2 - d1) if d2 != d1 else s1 / max(N - d1, 1)
    return Costs(
        full_token=t["full"],
        pipeline=t["idle"] - t["full"],
        head_check=max(t["head"] - t["idle"], 0.0),
        gate={m: max(t[f"gate_{m}"] - t["idle"], 0.0) for m in ("probe", "lowrank")},
        exit_per_layer=per_layer,
        exit_fixed=s1 - per_layer * (N - d1),
    )
