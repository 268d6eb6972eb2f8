"""Speculative decoding by prompt category: decode tok/s with speculation vs without, acceptance.

Five categories (rewrites, code edits, extraction/quoting, summaries, open chat; three prompts
each in ``benchmarks/prompts/speculative_prompts.jsonl``, ``--per-category`` of them used),
greedy, EOS honoured, ``--tokens`` at most. Per prompt, the run without speculation and one run
per mode follow each other in an order that rotates from prompt to prompt, so ratios are measured
under the same machine load (figures as in ``octomil eval --speculative``).
Also measured, interleaved: the wall time of one verification step of r rows (last token +
r - 1 drafts) over one single-row step, at a 200-token context: the cost model ``auto`` uses.

Writes ``benchmarks/results/speculative.json`` and ``speculative.png``.
Run: ``.venv/bin/python benchmarks/spec_bench.py`` (~5 min on 2 busy cores).
"""

import octomil  # noqa: F401, I001 - BLAS preload before mlx

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx

from octomil.calibrate.eval_speculative import OFF, SpecResult, run, summarize
from octomil.calibrate.evaluate import load_prompts
from octomil.engine.engine import Engine
from octomil.engine.layer_loop import LayerLoop
from octomil.engine.speculation import SpeculativeSettings
from octomil.engine.verify import rollback

sys.path.insert(0, str(Path(__file__).parent))
from engine_bench import cpu_model, git_commit  # noqa: E402

HERE = Path(__file__).parent
PROMPTS = HERE / "prompts" / "speculative_prompts.jsonl"
RESULTS = HERE / "results"
ROWS = (1, 2, 3, 5, 9)


def verification_cost(engine: Engine, repeats: int) -> dict[str, float]:
    """Median wall time of a step of r rows over a step of one row (interleaved rounds)."""
    loop = LayerLoop(engine.loaded.anatomy, engine.loaded.model)
    loop.prefill(list(range(1000, 1200)))
    times: dict[int, list[float]] = {r: [] for r in ROWS}
    for _ in range(repeats + 1):
        for r in ROWS:
            t = time.perf_counter()
            mx.eval(loop.decode(list(range(500, 500 + r)), None).logits)
            times[r].append(time.perf_counter() - t)
            rollback(loop, r)
    base = statistics.median(times[1][1:])
    return {str(r): round(statistics.median(times[r][1:]) / base, 3) for r in ROWS}


def compare(engine: Engine, prompts: list[dict], modes: list[str], k: int, tokens: int) -> dict:
    settings = [OFF, *(SpeculativeSettings(m, k) for m in modes)]
    warm = engine.encode_chat([{"role": "user", "content": "Hello"}])
    for s in settings:
        run(engine, warm, s, 4)  # warm-up, not measured
    results: dict[str, list[SpecResult]] = {m: [] for m in modes}
    for i, p in enumerate(prompts):
        ids = engine.encode_chat([{"role": "user", "content": p["prompt"]}])
        order = settings[i % len(settings) :] + settings[: i % len(settings)]
        runs = {s.mode: run(engine, ids, s, tokens) for s in order}
        for m in modes:
            results[m].append(SpecResult(p["category"], runs["off"], runs[m]))
        print(f"{i + 1}/{len(prompts)} {p['category']}", file=sys.stderr, flush=True)
    out = {}
    for m in modes:
        out[m] = {"num_speculative_tokens": k, **summarize(results[m])}
        cats = sorted({r.category for r in results[m]})
        out[m]["per_category"] = {
            c: summarize([r for r in results[m] if r.category == c]) for c in cats
        }
    return out


def render(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(data["modes"])
    cats = list(data["modes"][modes[0]]["per_category"])
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(modes)
    for k, mode in enumerate(modes):
        per = data["modes"][mode]["per_category"]
        vals = [per[c]["speedup_vs_full_depth"] for c in cats]
        xs = [i + k * width for i in range(len(cats))]
        bars = ax.bar(xs, vals, width, label=mode)
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xticks([i + width * (len(modes) - 1) / 2 for i in range(len(cats))], cats)
    ax.set_ylabel("decode tok/s vs no speculation")
    ax.set_title(f"Speculative decoding by category ({data['model']}, greedy, same tokens)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--modes", default="lookup,auto")
    ap.add_argument("--num-speculative-tokens", type=int, default=8)
    ap.add_argument("--per-category", type=int, default=2, help="prompts per category")
    ap.add_argument("--quick", action="store_true", help="one prompt per category, 24 tokens")
    args = ap.parse_args()
    engine = Engine.load(exit_policy="none")
    if args.quick:
        args.per_category, args.tokens = 1, 24
    count: dict[str, int] = {}
    prompts = []
    for p in load_prompts(PROMPTS):
        count[p["category"]] = count.get(p["category"], 0) + 1
        if count[p["category"]] <= args.per_category:
            prompts.append(p)
    data = {
        "model": engine.model_id,
        "cpu": cpu_model(),
        "commit": git_commit(),
        "tokens": args.tokens,
        "note": "2 shared cores (other engineers' tests running); ratios measured in one run",
        "verification_cost_vs_one_row": verification_cost(engine, 3 if args.quick else 8),
        "modes": compare(
            engine, prompts, args.modes.split(","), args.num_speculative_tokens, args.tokens
        ),
    }
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "speculative.json"
    out.write_text(json.dumps(data, indent=2) + "\n")
    render(data, RESULTS / "speculative.png")
    print(out)


if __name__ == "__main__":
    main()
