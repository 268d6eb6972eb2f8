"""Speculative decoding by prompt category: decode tok/s with speculation vs without, acceptance.

Six categories in ``benchmarks/prompts/speculative_prompts.jsonl`` (rewrites, code edits of
whole small files, code edits of 5-line functions, extraction/quoting, summaries, open chat;
``--per-category`` prompts each, ``--categories`` to pick some), greedy, EOS honoured,
``--tokens`` at most. Per prompt, the run without speculation and one run per mode follow each
other in an order that rotates from prompt to prompt, so ratios are measured under the same
machine load (figures as in ``octomil eval --speculative``, in wall clock and in this process's
CPU time). ``--rounds R`` repeats the whole set R times: ``per_round`` holds each round's
per-category ratios (the spread), the pooled figures are over all rounds.
Also measured, interleaved: the wall and CPU time of one verification step of r rows (last
token + r - 1 drafts) over one single-row step, at a 200-token context: the cost model ``auto``
uses.

Writes ``benchmarks/results/speculative.json`` and ``speculative.png`` (``--out NAME``: NAME.json
and NAME.png). Run: ``.venv/bin/python benchmarks/spec_bench.py`` (~8 min on 2 busy cores).
"""

import octomil  # noqa: F401, I001 - BLAS preload before mlx

import argparse
import json
import os
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


def verification_cost(engine: Engine, repeats: int) -> dict[str, dict[str, float]]:
    """Median wall / CPU time of a step of r rows over a step of one row (interleaved rounds)."""
    loop = LayerLoop(engine.loaded.anatomy, engine.loaded.model)
    loop.prefill(list(range(1000, 1200)))
    wall: dict[int, list[float]] = {r: [] for r in ROWS}
    cpu: dict[int, list[float]] = {r: [] for r in ROWS}
    for _ in range(repeats + 1):
        for r in ROWS:
            t, c = time.perf_counter(), time.process_time()
            mx.eval(loop.decode(list(range(500, 500 + r)), None).logits)
            wall[r].append(time.perf_counter() - t)
            cpu[r].append(time.process_time() - c)
            rollback(loop, r)

    def ratios(times: dict[int, list[float]]) -> dict[str, float]:
        base = statistics.median(times[1][1:])
        return {str(r): round(statistics.median(times[r][1:]) / base, 3) for r in ROWS}

    return {"wall": ratios(wall), "cpu": ratios(cpu)}


def by_category(results: list[SpecResult]) -> dict[str, dict]:
    cats = sorted({r.category for r in results})
    return {c: summarize([r for r in results if r.category == c]) for c in cats}


def compare(
    engine: Engine, prompts: list[dict], modes: list[str], k: int, tokens: int, rounds: int
) -> dict:
    settings = [OFF, *(SpeculativeSettings(m, k) for m in modes)]
    warm = engine.encode_chat([{"role": "user", "content": "Hello"}])
    for s in settings:
        run(engine, warm, s, 4)  # warm-up, not measured
    results: dict[str, list[list[SpecResult]]] = {m: [[] for _ in range(rounds)] for m in modes}
    step = 0
    for r in range(rounds):
        for i, p in enumerate(prompts):
            ids = engine.encode_chat([{"role": "user", "content": p["prompt"]}])
            order = settings[step % len(settings) :] + settings[: step % len(settings)]
            step += 1
            runs = {s.mode: run(engine, ids, s, tokens) for s in order}
            for m in modes:
                results[m][r].append(SpecResult(p["category"], runs["off"], runs[m]))
            print(f"{r + 1}.{i + 1}/{len(prompts)} {p['category']}", file=sys.stderr, flush=True)
    out = {}
    for m in modes:
        pooled = [x for per_round in results[m] for x in per_round]
        out[m] = {"num_speculative_tokens": k, **summarize(pooled)}
        out[m]["per_category"] = by_category(pooled)
        if rounds > 1:
            out[m]["per_round"] = [
                {
                    c: {
                        key: v[key]
                        for key in ("speedup_vs_full_depth", "cpu_speedup_vs_full_depth")
                    }
                    for c, v in by_category(per_round).items()
                }
                for per_round in results[m]
            ]
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
        vals = [per[c]["cpu_speedup_vs_full_depth"] for c in cats]
        xs = [i + k * width for i in range(len(cats))]
        bars = ax.bar(xs, vals, width, label=mode)
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xticks([i + width * (len(modes) - 1) / 2 for i in range(len(cats))], cats)
    ax.set_ylabel("decode tok/s vs no speculation (CPU time)")
    ax.set_title(f"Speculative decoding by category ({data['model']}, greedy, same tokens)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--modes", default="lookup,auto")
    ap.add_argument("--num-speculative-tokens", type=int, default=8)
    ap.add_argument("--per-category", type=int, default=4, help="prompts per category")
    ap.add_argument("--categories", default="", help="comma-separated; default all")
    ap.add_argument("--rounds", type=int, default=1, help="repeat the prompt set (spread)")
    ap.add_argument("--out", default="speculative", help="results/NAME.json and NAME.png")
    ap.add_argument("--quick", action="store_true", help="one prompt per category, 24 tokens")
    args = ap.parse_args()
    engine = Engine.load(exit_policy="none")
    if args.quick:
        args.per_category, args.tokens = 1, 24
    count: dict[str, int] = {}
    prompts = []
    wanted = set(filter(None, args.categories.split(",")))
    for p in load_prompts(PROMPTS):
        if wanted and p["category"] not in wanted:
            continue
        count[p["category"]] = count.get(p["category"], 0) + 1
        if count[p["category"]] <= args.per_category:
            prompts.append(p)
    data = {
        "model": engine.model_id,
        "cpu": cpu_model(),
        "commit": git_commit(),
        "tokens": args.tokens,
        "note": "2 shared cores (other engineers' tests running); ratios measured in one run",
        "command": " ".join(["benchmarks/spec_bench.py", *sys.argv[1:]]),
        "load_average_start": os.getloadavg()[0],
        "verification_cost_vs_one_row": verification_cost(engine, 3 if args.quick else 8),
        "modes": compare(
            engine,
            prompts,
            args.modes.split(","),
            args.num_speculative_tokens,
            args.tokens,
            args.rounds,
        ),
        "load_average_end": os.getloadavg()[0],
    }
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{args.out}.json"
    out.write_text(json.dumps(data, indent=2) + "\n")
    render(data, RESULTS / f"{args.out}.png")
    print(out)


if __name__ == "__main__":
    main()
