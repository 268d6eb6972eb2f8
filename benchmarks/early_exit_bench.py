"""Early-exit frontier: agreement vs layers vs wall clock, per preset and exit decision method.

For every preset (quality, balanced, fast) it evaluates, with ``octomil eval``'s own code
(``octomil.calibrate.evaluate``: teacher-forced token agreement, exact match, average layers,
decode tok/s against full depth in the same run):

- ``served``: what ``serve`` / ``generate`` do with the calibrated exit policy (checks placed only
  where calibration measured a saving; none = full depth);
- ``<method>-fewest-layers`` for method in entropy / probe / lowrank: the calibrated placement that
  uses the fewest layers within the preset's disagreement budget, whatever its wall clock: the
  depth/quality frontier each decision method reaches;
- ``lens``: the raw shared head with the preset's threshold at the engine's default candidate
  depths (no adapters): the pre-calibration behaviour.

Per prompt, full depth runs first and last and every configuration in between (rotated per prompt),
so machine noise hits all alike; speedups are pooled tok/s over the pooled full-depth tok/s.
Writes ``benchmarks/results/early_exit.json`` and ``early_exit.png``.

    .venv/bin/python benchmarks/early_exit_bench.py                 # ~20-30 min on 2 busy cores
    .venv/bin/python benchmarks/early_exit_bench.py --quick --out /tmp/ee.json   # smoke run
"""

from __future__ import annotations

import octomil  # noqa: F401  (first: loads OpenBLAS before anything imports mlx)

# isort: split
import argparse
import datetime as dt
import json
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

from engine_bench import cpu_model

from octomil.calibrate.evaluate import (
    PromptResult,
    Run,
    free_run,
    load_prompts,
    summarize,
    teacher_forced,
)
from octomil.calibrate.prompts import eval_prompts_path
from octomil.config import SpeedQuality, resolve_early_exit
from octomil.engine.engine import Engine
from octomil.engine.exit_policy import ExitPolicy

ROOT = Path(__file__).resolve().parent
METHODS = (
    "served",
    "entropy-fewest-layers",
    "probe-fewest-layers",
    "lowrank-fewest-layers",
    "lens",
)


def policies(engine: Engine, lens: Engine) -> dict[str, ExitPolicy | None]:
    out = {}
    for preset in SpeedQuality:
        settings = resolve_early_exit(preset)
        for method in METHODS:
            name = f"{preset.value}/{method}"
            if method == "lens":
                out[name] = lens.policy_for(settings)
            elif method == "served":
                out[name] = engine.policy_for(settings)
            else:
                out[name] = engine.policy_for(settings, method=method)
    return out


def describe(policy: ExitPolicy | None) -> dict:
    if policy is None:
        return {"method": "full depth", "exit_layers": []}
    return {
        "method": getattr(policy, "method", "lens"),
        "exit_layers": list(policy.exit_layers),
        "threshold": policy.threshold,
        "margin": getattr(policy, "margin", None),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=Path, default=eval_prompts_path())
    ap.add_argument("--every", type=int, default=2, help="Use every k-th prompt (default: 2 -> 16)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--exit-policy", default=None, help="Policy dir (default: the one found)")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "early_exit.json")
    ap.add_argument("--quick", action="store_true", help="3 prompts, 12 tokens (smoke run)")
    args = ap.parse_args()
    if args.quick:
        args.every, args.max_tokens = 11, 12

    engine = Engine.load(exit_policy=args.exit_policy)
    if engine.exit_bundle is None:
        sys.exit(f"no exit policy: {engine.exit_choice.status}")
    lens = Engine(engine.loaded)  # in-memory engine: the raw shared head
    prompts = load_prompts(args.prompts)[:: args.every]
    configs = policies(engine, lens)
    print(
        f"[bench] {len(prompts)} prompts x {len(configs)} configurations, {args.max_tokens} tokens"
    )
    for name, p in configs.items():
        print(f"  {name:<32} {describe(p)}")

    warm = engine.encode_chat([{"role": "user", "content": "Hello"}])
    for p in configs.values():
        free_run(engine, warm, p, 4)
    results: dict[str, list[PromptResult]] = {name: [] for name in configs}
    started = time.time()
    names = list(configs)
    # Configurations with the same policy (e.g. every "no check pays" one) run once per prompt.
    runs_for = {json.dumps(describe(p), sort_keys=True): name for name, p in configs.items()}
    distinct = list(runs_for.values())
    key = {name: runs_for[json.dumps(describe(p), sort_keys=True)] for name, p in configs.items()}
    for i, row in enumerate(prompts):
        ids = engine.encode_chat([{"role": "user", "content": row["prompt"]}])
        first = free_run(engine, ids, None, args.max_tokens)
        early = {}
        for name in distinct[i % len(distinct) :] + distinct[: i % len(distinct)]:
            early[name] = free_run(engine, ids, configs[name], args.max_tokens)
        last = free_run(engine, ids, None, args.max_tokens)
        # Greedy full depth is deterministic: both runs emit the same tokens; time is their mean.
        full = Run(first.tokens, first.layers, 0, (first.decode_s + last.decode_s) / 2)
        forced = {}
        for name in distinct:
            forced[name] = teacher_forced(engine, ids, full, early[name], configs[name])
        for name in names:
            r = PromptResult(row["category"], full, early[key[name]])
            r.agree, r.positions, r.forced_layers = forced[key[name]]
            results[name].append(r)
        print(
            f"[bench] prompt {i + 1}/{len(prompts)} done ({time.time() - started:.0f} s)",
            flush=True,
        )

    summary = {}
    for name in names:
        s = summarize(results[name], engine.total_layers)
        cats = sorted({r.category for r in results[name]})
        s["per_category"] = {
            c: summarize([r for r in results[name] if r.category == c], engine.total_layers)
            for c in cats
        }
        summary[name] = {**describe(configs[name]), **s}
        print(
            f"{name:<32} agree {s['token_agreement']:.2%}  layers {s['avg_layers_used']:.2f}  "
            f"exits {s['early_exit_share']:.1%}  speedup {s['speedup_vs_full_depth']:.3f}x"
        )
    m = engine.exit_bundle.manifest
    out = {
        "command": "python benchmarks/early_exit_bench.py " + shlex.join(sys.argv[1:]),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": _git("rev-parse", "HEAD"),
        "machine": {
            "platform": platform.platform(),
            "cpu": cpu_model(),
            "python": platform.python_version(),
        },
        "model": engine.model_id,
        "engine": engine.selection,
        "exit_policy": {
            "status": engine.exit_choice.status,
            "created": m.created,
            "timings_ms": m.timings_ms,
            "presets": {k: v.to_json() for k, v in m.presets.items()},
            "heldout": m.heldout,
        },
        "prompts": str(args.prompts),
        "prompt_count": len(prompts),
        "max_tokens": args.max_tokens,
        "results": summary,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    plot(summary, engine.total_layers, args.out.with_suffix(".png"))
    print(f"[bench] wrote {args.out} and {args.out.with_suffix('.png')}")


def plot(summary: dict, total_layers: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"quality": "tab:green", "balanced": "tab:blue", "fast": "tab:red"}
    markers = {m: k for m, k in zip(METHODS, "o^sDx", strict=True)}
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5))
    for name, s in summary.items():
        preset, method = name.split("/")
        kw = {"color": colors[preset], "marker": markers[method], "s": 60}
        left.scatter(s["avg_layers_used"], 100 * s["token_agreement"], **kw)
        right.scatter(s["avg_layers_used"], s["speedup_vs_full_depth"], **kw)
    for ax in (left, right):
        ax.set_xlabel(f"average layers used (of {total_layers})")
        ax.grid(alpha=0.3)
    left.set_ylabel("token agreement with full depth, teacher-forced (%)")
    left.set_title("Faithfulness vs depth")
    right.axhline(1.0, color="gray", lw=1)
    right.set_ylabel("decode speed vs full depth (same run)")
    right.set_title("Wall clock vs depth")
    handles = [plt.Line2D([], [], color=c, marker="o", ls="", label=p) for p, c in colors.items()]
    handles += [plt.Line2D([], [], color="k", marker=k, ls="", label=m) for m, k in markers.items()]
    left.legend(handles=handles, fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(
            ["git", *args], capture_output=True, text=True, cwd=ROOT
        ).stdout.strip()
    except OSError:
        return None


if __name__ == "__main__":
    main()
