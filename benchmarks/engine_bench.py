"""Engine benchmark: Octomil full depth vs each early-exit preset vs stock mlx-lm, in one run.

What it measures, per configuration, on a fixed chat prompt set of mixed difficulty
(``benchmarks/prompts/engine_prompts.jsonl``), all greedy, same ``max_tokens``, EOS honoured:

- decode tok/s: wall clock from the first generated token to the last, divided by (n - 1), so
  prefill is excluded; pooled over prompts (total tokens / total seconds);
- prefill tok/s: prompt tokens / time to first token;
- average layers used and early-exit token share (free-running generation);
- token agreement with Octomil full-depth greedy output, *teacher-forced*: the engine's
  ``LayerLoop`` is fed the full-depth sequence token by token and, at every decode position, the
  argmax of the logits it emits (possibly from an early exit) is compared with the next full-depth
  token. Deferred catch-up keeps the KV cache equal to the full-depth cache, so every position sees
  exactly the full-depth prefix. The first token comes from the full-depth prefill and is excluded.
- free-running exact match: share of prompts whose generated sequence equals the full-depth one;
- parity: stock mlx-lm (``mlx_lm.generate.generate_step``, greedy, on the same fp32 weights in
  mlx-lm's own modules, ``octomil.models.loader.load_stock_model``) vs Octomil full depth, token for
  token (expected: 100%). Stock runs with Octomil's few-row route switched off
  (``octomil.blas.route.disabled``), as MLX runs without Octomil: OpenBLAS preloaded, every product
  through sgemm.

Configurations are interleaved per prompt (round-robin, starting point rotated per prompt) so
machine noise hits all alike; each is warmed up once first. Results go to a JSON file (machine
info, per-prompt records, overall and per-category summaries) and a PNG next to it.

Re-run (uses the CPU heavily for ~10 min; run it on an otherwise idle machine):

    .venv/bin/python benchmarks/engine_bench.py                  # full run, writes results/engine.*
    .venv/bin/python benchmarks/engine_bench.py --quick --out /tmp/x.json   # smoke run
"""

from __future__ import annotations

import octomil  # first: loads OpenBLAS before anything imports mlx

# isort: split
import argparse
import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path

import mlx.core as mx
from mlx_lm.generate import generate_step

from octomil import blas
from octomil.blas import route
from octomil.config import EarlyExitSettings, resolve_early_exit
from octomil.engine.engine import Engine
from octomil.engine.exit_policy import ExitPolicy
from octomil.engine.layer_loop import LayerLoop
from octomil.engine.types import GenerationRequest, SamplingParams
from octomil.models.layout_cache import cpu_name
from octomil.models.loader import load_stock_model

HERE = Path(__file__).resolve().parent
DEFAULT_PROMPTS = HERE / "prompts" / "engine_prompts.jsonl"
DEFAULT_OUT = HERE / "results" / "engine.json"

FULL = "octomil-full"
STOCK = "mlx-lm"
PRESETS = ("quality", "balanced", "fast")
CONFIGS = (FULL, *PRESETS, STOCK)


@dataclass
class Run:
    """One timed generation."""

    config: str
    prompt_index: int
    category: str
    prompt_tokens: int
    tokens: list[int]
    ttft_s: float  # prefill + first token
    decode_s: float  # first token -> last token
    layers: list[int]  # layers used per generated token
    exited: int  # tokens that left early


@dataclass
class Forced:
    """Teacher-forced replay of the full-depth sequence under one exit policy."""

    config: str
    prompt_index: int
    category: str
    positions: int = 0  # decode positions compared (the prefill token is excluded)
    agree: int = 0
    exited: int = 0
    exited_agree: int = 0
    layers: list[int] = field(default_factory=list)


# --- prompts -------------------------------------------------------------------------------------


def load_prompts(path: Path, quick: bool) -> list[dict]:
    prompts = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if quick:  # one prompt from each of the first three categories
        seen: dict[str, dict] = {}
        for p in prompts:
            seen.setdefault(p["category"], p)
        prompts = list(seen.values())[:3]
    return prompts


# --- timed generation ----------------------------------------------------------------------------


def settings_for(config: str) -> EarlyExitSettings:
    return resolve_early_exit(None if config == FULL else config)


def run_octomil(engine: Engine, ids: list[int], config: str, max_tokens: int) -> Run:
    request = GenerationRequest(
        tuple(ids), SamplingParams(max_tokens=max_tokens, temperature=0.0), settings_for(config)
    )
    start = time.perf_counter()
    stamps, tokens, layers, exited = [], [], [], 0
    for event in engine.generate(request):
        stamps.append(time.perf_counter())
        tokens.append(event.token_id)
        layers.append(event.layers_used)
        exited += int(event.exited_early)
    return Run(
        config, -1, "", len(ids), tokens, stamps[0] - start, stamps[-1] - stamps[0], layers, exited
    )


_STOCK_MODELS: dict[int, object] = {}


def stock_model(engine: Engine):
    """The engine's weights in stock mlx-lm modules (the engine stores them differently)."""
    if id(engine) not in _STOCK_MODELS:
        _STOCK_MODELS[id(engine)] = load_stock_model(engine.loaded)
    return _STOCK_MODELS[id(engine)]


def run_stock(engine: Engine, ids: list[int], max_tokens: int) -> Run:
    """Stock mlx-lm greedy decoding on the same weights, stopping at EOS like the engine."""
    eos = engine.loaded.eos_token_ids
    model = stock_model(engine)
    stamps, tokens = [], []
    with route.disabled():  # stock MLX: every product through OpenBLAS's sgemm
        start = time.perf_counter()
        for token, _ in generate_step(mx.array(ids), model, max_tokens=max_tokens):
            stamps.append(time.perf_counter())
            tokens.append(int(token))
            if token in eos:
                break
    n = len(tokens)
    total = engine.total_layers
    return Run(
        STOCK, -1, "", len(ids), tokens, stamps[0] - start, stamps[-1] - stamps[0], [total] * n, 0
    )


def run_config(engine: Engine, ids: list[int], config: str, max_tokens: int) -> Run:
    if config == STOCK:
        return run_stock(engine, ids, max_tokens)
    return run_octomil(engine, ids, config, max_tokens)


def warm_up(engine: Engine, ids: list[int]) -> None:
    for config in CONFIGS:
        run_config(engine, ids, config, max_tokens=16)


def timed_runs(
    engine: Engine, prompts: list[dict], encoded: list[list[int]], max_tokens: int
) -> list[Run]:
    """Every configuration on every prompt, round-robin; the starting configuration rotates."""
    runs = []
    for i, (p, ids) in enumerate(zip(prompts, encoded, strict=True)):
        k = i % len(CONFIGS)
        for config in CONFIGS[k:] + CONFIGS[:k]:
            run = run_config(engine, ids, config, max_tokens)
            run.prompt_index, run.category = i, p["category"]
            runs.append(run)
            print(
                f"  [{i + 1}/{len(prompts)}] {config:<13} {len(run.tokens):3d} tok "
                f"{_rate(run):6.2f} tok/s  layers {sum(run.layers) / len(run.layers):5.2f}",
                flush=True,
            )
    return runs


# --- teacher-forced agreement --------------------------------------------------------------------


def teacher_forced(
    engine: Engine, ids: list[int], reference: list[int], policy: ExitPolicy | None
) -> Forced:
    """Feed ``reference`` (full-depth greedy tokens) and compare each emitted argmax with it."""
    assert engine.loaded.anatomy is not None, "early exit is not supported for this model"
    loop = LayerLoop(engine.loaded.anatomy, engine.loaded.model)
    loop.prefill(ids)
    forced = Forced("", -1, "")
    for prev, want in zip(reference[:-1], reference[1:], strict=True):
        step = loop.decode(prev, policy)
        got = int(mx.argmax(step.logits, axis=-1).item())
        forced.positions += 1
        forced.agree += int(got == want)
        forced.exited += int(step.exited)
        forced.exited_agree += int(step.exited and got == want)
        forced.layers.append(step.depth)
    return forced


def forced_runs(
    engine: Engine, prompts: list[dict], encoded: list[list[int]], runs: list[Run]
) -> list[Forced]:
    """Teacher-forced replay for full depth (checks the method: must be 100%) and each preset."""
    reference = {r.prompt_index: r.tokens for r in runs if r.config == FULL}
    out = []
    for i, (p, ids) in enumerate(zip(prompts, encoded, strict=True)):
        for config in (FULL, *PRESETS):
            f = teacher_forced(engine, ids, reference[i], engine.policy_for(settings_for(config)))
            f.config, f.prompt_index, f.category = config, i, p["category"]
            out.append(f)
        print(f"  [{i + 1}/{len(prompts)}] teacher-forced replay done", flush=True)
    return out


# --- summaries -----------------------------------------------------------------------------------


def first_divergence(a: list[int], b: list[int]) -> int:
    for k, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return k
    return min(len(a), len(b))


def summarize(runs: list[Run], forced: list[Forced]) -> dict:
    """Pooled metrics per configuration over the given runs (one category or all)."""
    reference = {r.prompt_index: r.tokens for r in runs if r.config == FULL}
    out = {}
    for config in CONFIGS:
        rs = [r for r in runs if r.config == config]
        decode_tokens = sum(len(r.tokens) - 1 for r in rs)
        decode_s = sum(r.decode_s for r in rs)
        layers = [d for r in rs for d in r.layers]
        matches = [r.tokens == reference[r.prompt_index] for r in rs]
        same_pos = sum(first_divergence(r.tokens, reference[r.prompt_index]) for r in rs)
        ref_len = sum(len(reference[r.prompt_index]) for r in rs)
        row = {
            "prompts": len(rs),
            "completion_tokens": sum(len(r.tokens) for r in rs),
            "decode_tok_s": decode_tokens / decode_s if decode_s else 0.0,
            "decode_tok_s_prompt_mean": _mean([_rate(r) for r in rs if r.decode_s > 0]),
            "prefill_tok_s": sum(r.prompt_tokens for r in rs) / sum(r.ttft_s for r in rs),
            "avg_layers_used": _mean(layers),
            "early_exit_share": sum(r.exited for r in rs) / len(layers),
            "free_running_exact_match": _mean([float(m) for m in matches]),
            # tokens generated before the first difference from full depth, over full-depth tokens
            "free_running_prefix_share": same_pos / ref_len,
        }
        fs = [f for f in forced if f.config == config]
        if fs:
            positions = sum(f.positions for f in fs)
            exited = sum(f.exited for f in fs)
            row |= {
                "tf_positions": positions,
                "tf_agreement": sum(f.agree for f in fs) / positions if positions else None,
                "tf_avg_layers_used": _mean([d for f in fs for d in f.layers]),
                "tf_early_exit_share": exited / positions if positions else None,
                "tf_exited_agreement": sum(f.exited_agree for f in fs) / exited if exited else None,
                "tf_full_depth_agreement": (
                    (sum(f.agree for f in fs) - sum(f.exited_agree for f in fs))
                    / (positions - exited)
                    if positions > exited
                    else None
                ),
            }
        out[config] = row
    for row in out.values():
        row["speed_vs_full"] = row["decode_tok_s"] / out[FULL]["decode_tok_s"]
        row["speed_vs_mlx_lm"] = row["decode_tok_s"] / out[STOCK]["decode_tok_s"]
    out[STOCK]["parity_token_match"] = _parity(runs, reference)
    return out


def _parity(runs: list[Run], reference: dict[int, list[int]]) -> float:
    """Share of positions where stock mlx-lm and Octomil full depth emit the same token."""
    same = total = 0
    for r in runs:
        if r.config == STOCK:
            ref = reference[r.prompt_index]
            same += sum(a == b for a, b in zip(r.tokens, ref, strict=False))
            total += max(len(r.tokens), len(ref))
    return same / total


def _rate(r: Run) -> float:
    return (len(r.tokens) - 1) / r.decode_s if r.decode_s > 0 else 0.0


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def by_category(runs: list[Run], forced: list[Forced]) -> dict:
    cats = sorted({r.category for r in runs})
    return {
        c: summarize([r for r in runs if r.category == c], [f for f in forced if f.category == c])
        for c in cats
    }


# --- machine info, output ------------------------------------------------------------------------


cpu_model = cpu_name  # one reader of /proc/cpuinfo (octomil.models.layout_cache)


def git_commit() -> str | None:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=HERE, capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("-dirty" if dirty else "")


def machine_info(engine: Engine, load_at_start: float) -> dict:
    return {
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "python": platform.python_version(),
        "mlx": version("mlx"),
        "mlx_lm": version("mlx-lm"),
        "octomil": octomil.__version__,
        "blas": blas.describe(),
        "engine_selection": engine.selection,
        "model": engine.model_id,
        "total_layers": engine.total_layers,
        # other processes share the cores: the 1-minute load before and after the run
        "load_average_1m": [round(load_at_start, 2), round(os.getloadavg()[0], 2)],
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "git_commit": git_commit(),
    }


def presets_info(engine: Engine) -> dict:
    info = {}
    for p in PRESETS:
        s, policy = settings_for(p), engine.policy_for(settings_for(p))
        info[p] = {
            "threshold": s.threshold,
            "min_layers": policy.min_layers if policy else None,
            "exit_layers": list(policy.exit_layers) if policy else [],
        }
    return info


def plot(summary: dict, total_layers: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {
        FULL: "#4c72b0",
        "quality": "#55a868",
        "balanced": "#dd8452",
        "fast": "#c44e52",
        STOCK: "#8c8c8c",
    }
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))

    rates = [summary[c]["decode_tok_s"] for c in CONFIGS]
    bars = left.bar(CONFIGS, rates, color=[colors[c] for c in CONFIGS])
    for bar, c in zip(bars, CONFIGS, strict=True):
        left.annotate(
            f"{summary[c]['decode_tok_s']:.1f}\n{summary[c]['speed_vs_full']:.2f}x full",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    left.set_ylabel("decode tokens/s (greedy, higher is better)")
    left.set_title("Decode speed by configuration")
    left.set_ylim(0, max(rates) * 1.25)

    xs = []
    for c in (FULL, *PRESETS):
        x, y = summary[c]["tf_avg_layers_used"], 100 * summary[c]["tf_agreement"]
        xs.append(x)
        right.scatter(x, y, s=80, color=colors[c], zorder=3, label=f"{c}: {x:.1f} layers, {y:.1f}%")
    right.set_xlim(min(total_layers / 2, min(xs) - 2), total_layers + 1)
    right.set_ylim(0, 105)
    right.set_xlabel(f"average layers used (of {total_layers})")
    right.set_ylabel("token agreement with full depth, %")
    right.legend(loc="lower left", fontsize=8)
    right.set_title("Agreement vs depth (teacher-forced on full-depth output)")
    right.grid(alpha=0.3)

    title = f"Octomil engine on {summary['_model']}: presets vs full depth vs stock mlx-lm"
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# (header, summary key, format, scale) of the printed table
TABLE = (
    ("decode tok/s", "decode_tok_s", "{:.2f}", 1),
    ("vs full", "speed_vs_full", "{:.2f}x", 1),
    ("vs mlx-lm", "speed_vs_mlx_lm", "{:.2f}x", 1),
    ("prefill tok/s", "prefill_tok_s", "{:.1f}", 1),
    ("avg layers", "avg_layers_used", "{:.2f}", 1),
    ("exit %", "early_exit_share", "{:.1f}", 100),
    ("tf layers", "tf_avg_layers_used", "{:.2f}", 1),
    ("tf agree %", "tf_agreement", "{:.1f}", 100),
    ("exact seq %", "free_running_exact_match", "{:.1f}", 100),
)


def print_table(summary: dict) -> None:
    """Free-running speed/layers, teacher-forced (tf) layers/agreement, free-running exact match."""
    print("\n" + f"{'config':<13}" + "".join(f"{h:>14}" for h, *_ in TABLE))
    for c in CONFIGS:
        cells = []
        for _, key, fmt, scale in TABLE:
            value = summary[c].get(key)
            cells.append("-" if value is None else fmt.format(scale * value))
        print(f"{c:<13}" + "".join(f"{cell:>14}" for cell in cells))
    parity = 100 * summary[STOCK]["parity_token_match"]
    print(f"parity (stock mlx-lm vs Octomil full depth, token match): {parity:.1f}%")


# --- main ----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = ap.add_argument
    add("--max-tokens", type=int, help="tokens per generation (default 64; 16 with --quick)")
    add("--quick", action="store_true", help="smoke run: 3 prompts, 16 tokens")
    add("--prompts", type=Path, default=DEFAULT_PROMPTS, help="JSONL of {prompt, category}")
    add("--out", type=Path, default=DEFAULT_OUT, help="results JSON; the PNG goes beside it")
    add("--model", help="model alias/path (default: the embedded model)")
    args = ap.parse_args(argv)
    if args.max_tokens is None:
        args.max_tokens = 16 if args.quick else 64
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    wall_start, load_at_start = time.perf_counter(), os.getloadavg()[0]
    prompts = load_prompts(args.prompts, args.quick)
    engine = Engine.load(args.model)
    print(f"[bench] {engine.selection}", flush=True)
    encoded = [engine.encode_chat([{"role": "user", "content": p["prompt"]}]) for p in prompts]

    print("[bench] warm-up", flush=True)
    warm_up(engine, encoded[0])
    n = len(prompts)
    print(
        f"[bench] timed: {n} prompts x {len(CONFIGS)} configs, {args.max_tokens} tokens", flush=True
    )
    runs = timed_runs(engine, prompts, encoded, args.max_tokens)
    print("[bench] teacher-forced agreement", flush=True)
    forced = forced_runs(engine, prompts, encoded, runs)

    summary = summarize(runs, forced)
    wall = time.perf_counter() - wall_start
    result = {
        "machine": machine_info(engine, load_at_start),
        "settings": {
            "max_tokens": args.max_tokens,
            "quick": args.quick,
            "prompts_file": str(args.prompts.resolve().relative_to(HERE.parent))
            if args.prompts.resolve().is_relative_to(HERE.parent)
            else str(args.prompts),
            "sampling": "greedy (temperature 0), EOS honoured",
            "presets": presets_info(engine),
            "configs": list(CONFIGS),
        },
        "summary": summary,
        "by_category": by_category(runs, forced),
        "runs": [asdict(r) | {"decode_tok_s": _rate(r)} for r in runs],
        "teacher_forced": [asdict(f) for f in forced],
        "prompts": prompts,
        "wall_time_s": round(wall, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    plot(summary | {"_model": engine.model_id}, engine.total_layers, args.out.with_suffix(".png"))
    print_table(summary)
    print(f"[bench] wrote {args.out} and {args.out.with_suffix('.png')} in {wall:.0f} s")


if __name__ == "__main__":
    main()
