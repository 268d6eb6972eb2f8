"""``octomil calibrate`` end to end: prompts -> self-distillation data -> adapters, probes ->
timings
-> per-preset placement -> an exit-policy directory.

Deterministic for a seed (prompt split, sampling, training batches, probe init); the measured
timings are this machine's, and with them the placement (recorded in the manifest).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import mlx.core as mx
import numpy as np

from octomil import __version__
from octomil.calibrate import adapters as adapt
from octomil.calibrate import collect
from octomil.calibrate.prompts import CALIBRATION_PROMPTS
from octomil.calibrate.thresholds import Costs, Replay, best_placement, simulate
from octomil.config import PRESETS, SpeedQuality
from octomil.engine.exit_adapters import AdaptedExitPolicy, ExitPolicyBundle, LowRankHead
from octomil.engine.policy_store import Manifest, PresetPlacement, weights_hash
from octomil.models.layout import COMPACT
from octomil.models.loader import LoadedModel

log = logging.getLogger(__name__)

# Candidate exit depths as shares of the stack (30 layers: 8, 15, 18, 21, 23, 25, 27); they
# include the presets' minimum depths (25%, 50%, 75%).
CANDIDATE_FRACTIONS = (0.25, 0.5, 0.6, 0.7, 0.75, 0.83, 0.9)
BUDGETS = {SpeedQuality.quality: 0.01, SpeedQuality.balanced: 0.03, SpeedQuality.fast: 0.08}
HELDOUT_SHARE = 0.2
PROBE_HIDDEN = 32
LOWRANK_RANK = 64
MAX_PROBE_TOKENS = 2500


class ProgressFactory(Protocol):
    def __call__(
        self, label: str, total: int
    ) -> contextlib.AbstractContextManager[Callable[[int], None]]: ...


@contextlib.contextmanager
def no_progress(label: str, total: int) -> Iterator[Callable[[int], None]]:
    yield lambda n: None


@dataclass
class CalibrationConfig:
    layers: tuple[int, ...] | None = None  # None: CANDIDATE_FRACTIONS of the stack
    tokens: int = 14000  # self-distillation token budget (greedy first, then sampled)
    max_new_tokens: int = 128
    seed: int = 0
    steps: int = 50  # KL fine-tuning steps (128 tokens each)
    lr: float = 3e-4
    timing_repeats: int = 6
    command: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def candidate_depths(total_layers: int) -> tuple[int, ...]:
    return tuple(
        sorted(
            {min(math.ceil(f * total_layers), total_layers - 1) for f in CANDIDATE_FRACTIONS} - {0}
        )
    )


def split_prompts(categories: list[str], seed: int, share: float = HELDOUT_SHARE) -> np.ndarray:
    """Boolean mask of held-out prompts: ``share`` of each category, chosen by ``seed``."""
    rng = np.random.default_rng(seed)
    held = np.zeros(len(categories), dtype=bool)
    for cat in sorted(set(categories)):
        idx = [i for i, c in enumerate(categories) if c == cat]
        k = max(1, round(share * len(idx))) if len(idx) > 1 else 0
        held[rng.choice(idx, size=k, replace=False)] = True
    return held


def calibrate(
    loaded: LoadedModel,
    encode_chat: Callable[[list[dict]], list[int]],
    config: CalibrationConfig,
    progress: ProgressFactory = no_progress,
    say: Callable[[str], None] = lambda s: None,
    prompts: tuple[tuple[str, str], ...] = CALIBRATION_PROMPTS,
) -> ExitPolicyBundle:
    anatomy = loaded.anatomy
    if anatomy is None:
        raise ValueError(f"early exit is not supported for model family {loaded.family!r}")
    t0 = time.perf_counter()
    N = anatomy.num_layers
    depths = tuple(sorted({d for d in (config.layers or candidate_depths(N))}))
    bad = [d for d in depths if not 1 <= d < N]
    if bad:
        raise ValueError(
            f"exit layers must be within 1..{N - 1} (depths a token may exit after), got {bad}"
        )
    categories = [c for c, _ in prompts]
    ids = [encode_chat([{"role": "user", "content": p}]) for _, p in prompts]
    held_prompt = split_prompts(categories, config.seed)
    timings: dict[str, float] = {}

    # 1. the model's own continuations
    with progress("generating", config.tokens) as tick:
        seqs = collect.generate(
            loaded.model,
            ids,
            loaded.eos_token_ids,
            config.tokens,
            config.max_new_tokens,
            config.seed,
            tick,
        )
    timings["generate_s"] = time.perf_counter() - t0
    # 2. hidden states along them
    t = time.perf_counter()
    with progress("collecting hidden states", len(seqs)) as tick:
        states = collect.collect_states(anatomy, seqs, depths, tick)
    timings["collect_s"] = time.perf_counter() - t
    held = held_prompt[states.prompt_index]
    train, test = states.subset(~held), states.subset(held)
    say(
        f"{states.num_tokens} tokens from {len(seqs)} continuations: {train.num_tokens} train, "
        f"{test.num_tokens} held out ({int(held_prompt.sum())} prompts)"
    )

    # 3. adapters: least squares, then KL fine-tuning
    t = time.perf_counter()
    init = {d: adapt.lstsq_adapter(train.by_depth[d], train.final) for d in depths}
    with progress("training adapters", config.steps) as tick:
        trained, losses = adapt.kl_finetune(
            anatomy,
            init,
            train.by_depth,
            train.final,
            config.steps,
            config.seed,
            config.lr,
            progress=tick,
        )
    timings["train_s"] = time.perf_counter() - t

    # 4. held-out scores: logit lens vs adapters
    t = time.perf_counter()
    test_top = adapt.final_top1(anatomy, test.final)
    lens, scored = {}, {}
    with progress("scoring held-out tokens", 2 * len(depths)) as tick:
        for d in depths:
            lens[d] = adapt.score(anatomy, None, test.by_depth[d], test_top)
            tick(1)
            scored[d] = adapt.score(anatomy, trained[d], test.by_depth[d], test_top)
            tick(1)

    # 5. gates: probes trained on (a sample of) training tokens; the low-rank head
    rng = np.random.default_rng(config.seed)
    sample = rng.choice(
        train.num_tokens, size=min(MAX_PROBE_TOKENS, train.num_tokens), replace=False
    )
    train_top = adapt.final_top1(anatomy, train.final[sample])
    probes = {}
    with progress("training gate probes", len(depths)) as tick:
        for d in depths:
            h = train.by_depth[d][sample]
            ent = adapt.score(anatomy, trained[d], h, train_top)["entropy"]
            probes[d] = adapt.train_probe(
                anatomy, trained[d], h, ent, PROBE_HIDDEN, config.seed + d
            )
            tick(1)
    lowrank = LowRankHead.from_anatomy(anatomy, LOWRANK_RANK)
    gate_scores = {
        "probe": {
            d: adapt.probe_scores(anatomy, trained[d], probes[d], test.by_depth[d]) for d in depths
        },
        "lowrank": {
            d: adapt.lowrank_scores(anatomy, trained[d], lowrank, test.by_depth[d]) for d in depths
        },
    }
    timings["score_s"] = time.perf_counter() - t

    # 6. what checks and exits cost here; 7. placement per preset and method
    t = time.perf_counter()
    draft = _bundle(loaded, depths, trained, probes, {}, {}, {}, {}, config)
    draft._lowrank = lowrank
    replay = Replay(
        entropy={d: scored[d]["entropy"] for d in depths},
        agree={d: scored[d]["agree"] for d in depths},
        gate_score=gate_scores,
        total_layers=N,
    )
    timing_prompt = ids[int(np.flatnonzero(held_prompt)[0])]
    costs = measure_here(loaded, draft, timing_prompt, config.timing_repeats, progress, say)
    timings["timing_s"] = time.perf_counter() - t
    placements = place_presets(replay, costs, depths, N, say)

    heldout = {
        "tokens": int(test.num_tokens),
        "prompts": int(held_prompt.sum()),
        "top1_agreement": {
            str(d): {
                "lens": round(float(lens[d]["agree"].mean()), 4),
                "adapter": round(float(scored[d]["agree"].mean()), 4),
            }
            for d in depths
        },
        "lens_naive_disagreement": _lens_naive(lens, depths, N),
        "kl_loss_first_last": [round(losses[0], 4), round(losses[-1], 4)] if losses else [],
    }
    timings["total_s"] = time.perf_counter() - t0
    calibration = {
        "prompts": len(prompts),
        "heldout_share": HELDOUT_SHARE,
        "tokens": int(states.num_tokens),
        "train_tokens": int(train.num_tokens),
        "heldout_tokens": int(test.num_tokens),
        "token_budget": config.tokens,
        "max_new_tokens": config.max_new_tokens,
        "seed": config.seed,
        "kl_steps": config.steps,
        "lr": config.lr,
        "batch_tokens": 128,
        "wall_clock_s": {k: round(v, 1) for k, v in timings.items()},
        "command": config.command,
        **config.extra,
    }
    bundle = _bundle(
        loaded, depths, trained, probes, placements, costs.to_json(), heldout, calibration, config
    )
    bundle.replay = replay
    bundle.timing_prompt = timing_prompt
    return bundle


def measure_here(
    loaded: LoadedModel,
    bundle: ExitPolicyBundle,
    prompt: list[int],
    repeats: int,
    progress: ProgressFactory = no_progress,
    say: Callable[[str], None] = lambda s: None,
) -> Costs:
    """Measure check and exit costs with ``bundle``'s adapters and gates (see ``timing``)."""
    from octomil.calibrate.timing import measure_costs
    from octomil.config import EarlyExitSettings

    depths = bundle.manifest.adapter_layers
    N = bundle.manifest.total_layers
    mid = depths[len(depths) // 2]
    exit_pair = (depths[0], depths[-1]) if len(depths) > 1 else (depths[0], depths[0])

    def make_policy(method: str) -> AdaptedExitPolicy:
        settings = EarlyExitSettings(1.0, 1 / N)
        policy = bundle.policy(settings, loaded.anatomy, method=method, layers=(mid,), margin=0.0)
        assert policy is not None
        return policy

    with progress("timing checks and exits", repeats + 1) as tick:
        costs = measure_costs(loaded, prompt, make_policy, mid, exit_pair, repeats, tick)
    say(
        f"costs here: full-depth token {costs.full_token:.1f} ms; having checks "
        f"{costs.pipeline:+.1f} ms/token; head check {costs.head_check:.1f} ms; probe gate "
        f"{costs.gate['probe']:.2f} ms; low-rank gate {costs.gate['lowrank']:.2f} ms; an exit "
        f"saves {costs.exit_per_layer:.2f} ms per skipped layer {costs.exit_fixed:+.1f} ms"
    )
    return costs


def place_presets(
    replay: Replay,
    costs: Costs,
    depths: tuple[int, ...],
    N: int,
    say: Callable[[str], None] = lambda s: None,
) -> dict[str, PresetPlacement]:
    placements = {p.value: _place(replay, costs, p, depths, N) for p in SpeedQuality}
    for name, p in placements.items():
        say(f"{name}: {p.note}")
    return placements


REPLAY_FILE = "heldout_replay.npz"


def save_replay(path: Path, replay: Replay, timing_prompt: list[int]) -> None:
    """Held-out per-token measurements, so ``octomil calibrate --retime`` can re-place checks for
    another machine's costs without retraining."""
    arrays = {"timing_prompt": np.asarray(timing_prompt, dtype=np.int32)}
    for d in replay.entropy:
        arrays[f"entropy_{d}"] = replay.entropy[d].astype(np.float16)
        arrays[f"agree_{d}"] = replay.agree[d]
        for m, scores in replay.gate_score.items():
            arrays[f"{m}_{d}"] = scores[d].astype(np.float16)
    np.savez_compressed(Path(path) / REPLAY_FILE, **arrays)


def load_replay(path: Path, depths: tuple[int, ...], N: int) -> tuple[Replay, list[int]]:
    file = Path(path) / REPLAY_FILE
    if not file.is_file():
        raise ValueError(f"{path} has no {REPLAY_FILE}: re-run a full `octomil calibrate`")
    z = np.load(file)
    replay = Replay(
        entropy={d: z[f"entropy_{d}"].astype(np.float32) for d in depths},
        agree={d: z[f"agree_{d}"] for d in depths},
        gate_score={
            m: {d: z[f"{m}_{d}"].astype(np.float32) for d in depths} for m in ("probe", "lowrank")
        },
        total_layers=N,
    )
    return replay, [int(t) for t in z["timing_prompt"]]


def retime(
    loaded: LoadedModel,
    bundle: ExitPolicyBundle,
    path: Path,
    repeats: int,
    progress: ProgressFactory = no_progress,
    say: Callable[[str], None] = lambda s: None,
) -> ExitPolicyBundle:
    """Re-measure costs here and re-place every preset's checks; adapters and gates are kept."""
    m = bundle.manifest
    replay, prompt = load_replay(path, m.adapter_layers, m.total_layers)
    costs = measure_here(loaded, bundle, prompt, repeats, progress, say)
    placements = place_presets(replay, costs, m.adapter_layers, m.total_layers, say)
    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    manifest = replace(
        m,
        presets=placements,
        timings_ms=costs.to_json(),
        calibration={**m.calibration, "retimed": now},
    )
    out = ExitPolicyBundle(manifest, bundle.adapters, bundle.probes, bundle.path)
    out.replay, out.timing_prompt = replay, prompt
    return out


def _place(
    replay: Replay, costs: Costs, preset: SpeedQuality, depths: tuple[int, ...], N: int
) -> PresetPlacement:
    p = PRESETS[preset]
    min_layers = max(1, math.ceil(p.min_layers_fraction * N))
    budget = BUDGETS[preset]
    per_method, frontier = {}, {}
    for method in ("entropy", "probe", "lowrank"):
        per_method[method], frontier[method] = best_placement(
            replay, costs, method, depths, p.threshold, min_layers, budget
        )
    chosen = max(per_method.values(), key=lambda o: (o.saving_ms, -len(o.layers)))
    allowed = tuple(d for d in depths if min_layers <= d < N)
    naive = simulate(replay, costs, "entropy", allowed, p.threshold, 0.0)
    ceiling = oracle_ceiling(replay, costs, allowed)
    notes = []
    if naive.disagreement > budget:
        notes.append(
            f"checking every candidate depth {allowed[0]}..{allowed[-1]} would disagree on "
            f"{naive.disagreement:.1%} > budget {budget:.0%}: layer set tightened"
        )
    if chosen.layers:
        notes.append(
            f"{chosen.method} at {','.join(map(str, chosen.layers))}: held-out disagreement "
            f"{chosen.disagreement:.2%} (budget {budget:.0%}), "
            f"avg layers {chosen.avg_layers:.2f}/{N}, "
            f"expected speedup {chosen.expected_speedup:.3f}x"
        )
    else:
        notes.append(
            f"no placement saves >= 1% within the {budget:.0%} budget on this machine: full depth "
            f"(checking every candidate depth: {naive.expected_speedup:.3f}x expected)"
        )
    notes.append(
        f"ceiling (free, perfect exit signal at these depths): {ceiling['avg_layers']:.2f}/{N} "
        f"layers, {ceiling['expected_speedup']:.3f}x expected"
    )
    few = min(frontier.values(), key=lambda o: o.avg_layers)
    notes.append(
        f"fewest layers within budget: {few.method} at {','.join(map(str, few.layers)) or '-'} -> "
        f"{few.avg_layers:.2f}/{N} layers, {few.disagreement:.2%} disagreement, "
        f"{few.expected_speedup:.3f}x expected"
    )
    return PresetPlacement(
        threshold=p.threshold,
        min_layers=min_layers,
        budget=budget,
        method=chosen.method,
        layers=chosen.layers,
        margin=chosen.margin,
        measured={**chosen.to_json(), "ceiling": ceiling},
        methods={
            **{m: o.to_json() for m, o in per_method.items()},
            # Fewest layers within budget whatever the wall clock: for the frontier benchmark.
            **{f"{m}-fewest-layers": o.to_json() for m, o in frontier.items()},
        },
        note="; ".join(notes),
    )


def oracle_ceiling(replay: Replay, costs: Costs, allowed: tuple[int, ...]) -> dict[str, float]:
    """A free and perfect exit signal: each token leaves at the first allowed depth whose adapted
    top-1 already equals the final one (no check costs, no disagreement); exits still pay the
    measured catch-up and the cost of having checks."""
    n = len(next(iter(replay.entropy.values())))
    N = replay.total_layers
    depth = np.full(n, float(N))
    saving = np.zeros(n)
    alive = np.ones(n, dtype=bool)
    for d in allowed:
        exits = alive & replay.agree[d]
        depth[exits] = d
        saving[exits] = costs.exit_saving(d, N)
        alive &= ~exits
    mean = float(saving.mean()) - (costs.pipeline if allowed else 0.0)
    return {
        "avg_layers": round(float(depth.mean()), 3),
        "exit_share": round(float((~alive).mean()), 4),
        "expected_speedup": round(costs.full_token / max(costs.full_token - mean, 1e-9), 4),
    }


def _lens_naive(lens: dict, depths: tuple[int, ...], N: int) -> dict[str, float]:
    """Disagreement of the raw shared head with each preset's threshold at every candidate depth."""
    out = {}
    for preset, p in PRESETS.items():
        min_layers = max(1, math.ceil(p.min_layers_fraction * N))
        n = len(next(iter(lens.values()))["entropy"])
        alive = np.ones(n, dtype=bool)
        wrong = np.zeros(n, dtype=bool)
        for d in depths:
            if d < min_layers:
                continue
            exits = alive & (lens[d]["entropy"] <= p.threshold)
            wrong |= exits & ~lens[d]["agree"]
            alive &= ~exits
        out[preset.value] = round(float(wrong.mean()), 4)
    return out


def _bundle(
    loaded, depths, trained, probes, placements, costs, heldout, calibration, config
) -> ExitPolicyBundle:
    anatomy = loaded.anatomy
    manifest = Manifest(
        model_id=loaded.name,
        weights_sha256=weights_hash(loaded.source),
        total_layers=anatomy.num_layers,
        hidden_size=int(trained[depths[0]].A.shape[0]),
        adapter_layers=depths,
        presets=placements,
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        octomil_version=__version__,
        probe_hidden=PROBE_HIDDEN,
        lowrank_rank=LOWRANK_RANK,
        timings_ms=costs,
        heldout=heldout,
        calibration=calibration,
        weights_format=loaded.layout.layout if loaded.layout.layout in COMPACT else "float32",
    )
    mx.eval([a.A for a in trained.values()], [a.b for a in trained.values()])
    return ExitPolicyBundle(manifest, dict(trained), dict(probes), None)
