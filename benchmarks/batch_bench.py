"""Engine-level batching: aggregate decode tok/s by batch size, with and without early exit.

For each batch size B, B held-out chat prompts decode ``--tokens`` tokens each through one
:class:`~octomil.engine.scheduler.Scheduler` (``max_batch_size=B``); the clock runs from the step in
which every sequence is decoding until the last token, so the figure is decode throughput. In the
same run, interleaved round by round:

- ``full``: Octomil at full depth;
- ``exit_row`` / ``exit_batch``: early exit on the raw shared head (``--exit-policy lens``, the
  balanced preset: the only setting that exits on the embedded model) with each exit rule: a row
  leaves alone ("row") or only when every row of the batch is confident ("batch");
- ``full_mlx_ops``: Octomil at full depth with its kernels off (``octomil.kernels.decode``:
  SwiGLU, attention, softmax and vocabulary reductions in MLX's own operations), to show what the
  kernels are worth;
- ``stock``: stock mlx-lm's ``batch_generate`` on the same fp32 weights with Octomil's few-row
  route switched off (stock MLX), its own reported generation tok/s.

Writes ``benchmarks/results/batch.json`` and ``batch.png``.
Run: ``.venv/bin/python benchmarks/batch_bench.py`` (``--quick`` for a smoke run).
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

from octomil.blas import route
from octomil.config import resolve_early_exit
from octomil.engine.engine import Engine
from octomil.engine.scheduler import Scheduler, SchedulerConfig
from octomil.engine.types import GenerationRequest, SamplingParams
from octomil.kernels import decode
from octomil.models.loader import load_stock_model

sys.path.insert(0, str(Path(__file__).parent))
from engine_bench import cpu_model, git_commit  # noqa: E402

from octomil.calibrate.prompts import eval_prompts_path  # noqa: E402

HERE = Path(__file__).parent
PROMPTS = eval_prompts_path()
RESULTS = HERE / "results"
BALANCED = resolve_early_exit(preset="balanced")


def octomil_run(engine: Engine, prompts: list[list[int]], tokens: int, config: str) -> dict:
    rule = "batch" if config == "exit_batch" else "row"
    early_exit = BALANCED if config.startswith("exit") else None
    scheduler = Scheduler(SchedulerConfig(max_batch_size=len(prompts), exit_rule=rule))
    gens = [
        engine.generate(
            GenerationRequest(
                tuple(p), SamplingParams(max_tokens=tokens, ignore_eos=True), early_exit
            )
        )
        for p in prompts
    ]
    for g in gens:
        scheduler.submit(g)
    while any(g.stats.completion_tokens == 0 for g in gens):
        scheduler.step()
    mx.synchronize()
    start, counted = time.perf_counter(), 0
    while not scheduler.idle:
        counted += len(scheduler.step().events)
    elapsed = time.perf_counter() - start
    layers = [d for g in gens for d in g.stats.layers_used[1:]]
    return {
        "tok_s": counted / elapsed,
        "avg_layers": sum(layers) / len(layers),
        "outputs": [g.output_tokens for g in gens],
    }


def stock_run(model, engine: Engine, prompts: list[list[int]], tokens: int) -> dict:  # noqa: ANN001
    from mlx_lm.generate import batch_generate
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    tokenizer = TokenizerWrapper(engine.tokenizer, eos_token_ids=set(engine.loaded.eos_token_ids))

    with route.disabled():
        response = batch_generate(model, tokenizer, prompts, max_tokens=tokens)
    return {"tok_s": response.stats.generation_tps, "avg_layers": None}


def agreement(outputs: list[list[int]], reference: list[list[int]]) -> float:
    """Share of sequences whose tokens equal full depth's, position by position until the first
    difference (a free-running exact-match measure, averaged over tokens)."""
    same = total = 0
    for out, ref in zip(outputs, reference, strict=True):
        n = 0
        while n < min(len(out), len(ref)) and out[n] == ref[n]:
            n += 1
        same += n
        total += len(ref)
    return same / total if total else 1.0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-sizes", default="1,2,4,8,16")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="batch sizes 1,4; 16 tokens; 1 round")
    ap.add_argument("--out", type=Path, default=RESULTS / "batch.json")
    args = ap.parse_args(argv)
    sizes = [1, 4] if args.quick else [int(b) for b in args.batch_sizes.split(",")]
    tokens, rounds = (16, 1) if args.quick else (args.tokens, args.rounds)
    load_at_start = os.getloadavg()[0]

    engine = Engine.load(exit_policy="lens")
    texts = [json.loads(line)["prompt"] for line in PROMPTS.read_text().splitlines() if line]
    prompts = [engine.encode_chat([{"role": "user", "content": t}]) for t in texts]
    prompts = (prompts * (max(sizes) // len(prompts) + 1))[: max(sizes)]
    stock = load_stock_model(engine.loaded)
    configs = ["full", "full_mlx_ops", "exit_row", "exit_batch", "stock"]

    octomil_run(engine, prompts[:2], 4, "full")  # warm-up: compiled kernels, tables
    results: dict[str, dict[int, list[dict]]] = {c: {b: [] for b in sizes} for c in configs}
    for r in range(rounds):
        for b in sizes:
            order = configs[r % len(configs) :] + configs[: r % len(configs)]
            for config in order:
                if config == "stock":
                    run = stock_run(stock, engine, prompts[:b], tokens)
                elif config == "full_mlx_ops":
                    with decode.disabled():
                        run = octomil_run(engine, prompts[:b], tokens, "full")
                else:
                    run = octomil_run(engine, prompts[:b], tokens, config)
                results[config][b].append(run)
                print(f"round {r} batch {b:2d} {config:10s} {run['tok_s']:7.1f} tok/s", flush=True)

    summary: dict[str, dict] = {}
    for config in configs:
        summary[config] = {}
        for b in sizes:
            runs = results[config][b]
            entry = {"tok_s": round(statistics.median(x["tok_s"] for x in runs), 2)}
            if runs[0]["avg_layers"] is not None:
                entry["avg_layers"] = round(statistics.mean(x["avg_layers"] for x in runs), 2)
            if config.startswith("exit"):
                ref = results["full"][b][0]["outputs"]
                entry["agreement_with_full_depth"] = round(agreement(runs[0]["outputs"], ref), 4)
            summary[config][b] = entry
    one = summary["full"][sizes[0]]["tok_s"]
    for b in sizes:
        summary["full"][b]["vs_kernels_off"] = round(
            summary["full"][b]["tok_s"] / summary["full_mlx_ops"][b]["tok_s"], 2
        )
        summary["full"][b]["vs_batch_1"] = round(summary["full"][b]["tok_s"] / one, 2)
        summary["full"][b]["vs_stock"] = round(
            summary["full"][b]["tok_s"] / summary["stock"][b]["tok_s"], 2
        )
    payload = {
        "command": "python benchmarks/batch_bench.py " + " ".join(argv or sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {
            "cpu": cpu_model(),
            "load_average_at_start": load_at_start,
            "load_average_at_end": os.getloadavg()[0],
            "blas": octomil.blas.describe(),
            "kernels": decode.status(),
            "commit": git_commit(),
        },
        "tokens_per_sequence": tokens,
        "rounds": rounds,
        "summary": summary,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=1) + "\n")
    plot(summary, sizes, args.out.with_suffix(".png"))
    print(json.dumps(summary, indent=1))


def plot(summary: dict, sizes: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    labels = {
        "full": "Octomil full depth",
        "full_mlx_ops": "Octomil full depth, kernels off (MLX ops)",
        "exit_row": "Octomil early exit (lens, balanced), row rule",
        "exit_batch": "Octomil early exit (lens, balanced), batch rule",
        "stock": "stock mlx-lm batch_generate",
    }
    for config, label in labels.items():
        ax.plot(sizes, [summary[config][b]["tok_s"] for b in sizes], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(b) for b in sizes])
    ax.set_xlabel("sequences decoded together (batch size)")
    ax.set_ylabel("aggregate decode tok/s")
    ax.set_title("Decode throughput by batch size (SmolLM2-135M, fp32, 2 cores)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
