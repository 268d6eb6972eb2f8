"""Where serving time goes: reading prompts vs decoding, one client vs many, per prompt chunk size.

The serving benchmark (``serve_bench.py``) measures what clients see. This one explains it,
inside one process with the engine's own scheduler (no HTTP), on the serving benchmark's own
request mix (held-out chat prompts, every 8th one long: 500/1000/1500 tokens):

- *alone*: every request served by itself, one after another (one client);
- *batched*: ``--clients`` closed-loop clients (each sends its next request when the previous
  ends) through one scheduler with ``--max-batch-size``;

for each prompt chunk size (``--chunks``: the server's ``--max-prefill-tokens-per-step``),
interleaved in one run. The clock is split into time spent reading prompts (the chunks' passes,
which are compute-bound: 16 prompts cost as much read together as one after another) and the rest
(decode steps, sampling, bookkeeping). From the split it reports the measured aggregate ratio
(batched tok/s over alone tok/s) and two bounds that follow from it:

- ``ratio_if_prefill_free``: alone decode time / batched decode time — what batching gives the
  decode part;
- ``ratio_bound``: (alone prefill + alone decode) / (alone prefill + batched decode) — the best
  ratio with prompt reading as it is, when decode steps never wait for prompts.

Also inter-token latency (gaps between a request's tokens, pooled) p50/p95 and time to first
token, so the chunk size's trade-off (short steps vs many steps per prompt) is visible.

    .venv/bin/python benchmarks/serve_time_split.py          # ~6 min: results/serve_time_split.*
"""

import octomil  # noqa: F401, I001 - BLAS preload before mlx

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from octomil.engine.engine import Engine
from octomil.engine.generation import Generation
from octomil.engine.scheduler import Scheduler, SchedulerConfig
from octomil.engine.types import GenerationRequest, SamplingParams

sys.path.insert(0, str(Path(__file__).parent))
from engine_bench import cpu_model, git_commit  # noqa: E402
from serve_bench import request_prompts  # noqa: E402

RESULTS = Path(__file__).parent / "results"


@dataclass
class Run:
    """One serving run: wall clock split, tokens and per-request token times."""

    wall_s: float = 0.0
    prefill_s: float = 0.0
    tokens: int = 0
    stamps: dict[int, list[float]] = field(default_factory=dict)
    ttft: list[float] = field(default_factory=list)

    def summary(self) -> dict:
        gaps = [b - a for v in self.stamps.values() for a, b in zip(v, v[1:], strict=False)]
        p50, p95 = (float(x) for x in np.percentile(gaps, [50, 95]))
        return {
            "wall_s": round(self.wall_s, 3),
            "prefill_s": round(self.prefill_s, 3),
            "decode_s": round(self.wall_s - self.prefill_s, 3),
            "tokens": self.tokens,
            "tok_s": round(self.tokens / self.wall_s, 2),
            "itl_p50_ms": round(p50 * 1000, 1),
            "itl_p95_ms": round(p95 * 1000, 1),
            "ttft_p50_s": round(float(np.median(self.ttft)), 3),
            "ttft_p95_s": round(float(np.percentile(self.ttft, 95)), 3),
        }


def serve(engine: Engine, prompts: list[list[int]], clients: int, batch: int, tokens: int) -> Run:
    """Closed loop: ``clients`` requests in flight until every prompt was served."""
    run = Run()
    scheduler = Scheduler(SchedulerConfig(max_batch_size=batch))
    pending = list(prompts)
    sent: dict[int, float] = {}
    feed = Generation.feed_chunk

    def timed_feed(gen: Generation) -> int:
        t = time.perf_counter()
        n = feed(gen)
        run.prefill_s += time.perf_counter() - t
        return n

    def submit() -> None:
        params = SamplingParams(max_tokens=tokens)
        gen = engine.generate(GenerationRequest(tuple(pending.pop(0)), params))
        sent[id(gen)] = time.perf_counter()
        scheduler.submit(gen)

    Generation.feed_chunk = timed_feed  # type: ignore[method-assign]
    try:
        start = time.perf_counter()
        for _ in range(min(clients, len(pending))):
            submit()
        while not scheduler.idle:
            out = scheduler.step()
            now = time.perf_counter()
            for gen, _event in out.events:
                stamps = run.stamps.setdefault(id(gen), [])
                if not stamps:
                    run.ttft.append(now - sent[id(gen)])
                stamps.append(now)
                run.tokens += 1
            for _ in out.finished:
                if pending:
                    submit()
        run.wall_s = time.perf_counter() - start
    finally:
        Generation.feed_chunk = feed  # type: ignore[method-assign]
    return run


def alone(engine: Engine, prompts: list[list[int]], batch: int, tokens: int) -> Run:
    """Each request by itself, one after another: the sum of one client's requests."""
    total = Run()
    for prompt in prompts:
        one = serve(engine, [prompt], 1, batch, tokens)
        total.wall_s += one.wall_s
        total.prefill_s += one.prefill_s
        total.tokens += one.tokens
        total.ttft += one.ttft
        total.stamps.update({len(total.stamps): v for v in one.stamps.values()})
    return total


def compare(single: dict, many: dict) -> dict:
    p, d, d_b = single["prefill_s"], single["decode_s"], many["decode_s"]
    return {
        "ratio": round(many["tok_s"] / single["tok_s"], 2),
        "ratio_if_prefill_free": round(d / d_b, 2),
        "ratio_bound": round((p + d) / (p + d_b), 2),
        "prefill_share_alone": round(p / single["wall_s"], 3),
        "prefill_share_batched": round(many["prefill_s"] / many["wall_s"], 3),
        "itl_p95_vs_alone": round(many["itl_p95_ms"] / single["itl_p95_ms"], 2),
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["chunks"]
    labels = [f"{r['chunk']}\n{kind}" for r in rows for kind in ("alone", "batched")]
    runs = [r[kind] for r in rows for kind in ("alone", "batched")]
    x = np.arange(len(runs))
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar(x, [r["prefill_s"] for r in runs], label="reading prompts")
    ax.bar(x, [r["decode_s"] for r in runs], bottom=[r["prefill_s"] for r in runs], label="decode")
    ax.set_xticks(x, labels)
    ax.set_ylabel("seconds for the same requests")
    ax.set_xlabel("prompt chunk (tokens) / one client vs many")
    ax.set_title(f"Serving time split, {result['settings']['clients']} clients (engine, no HTTP)")
    for xi, r in zip(x, runs, strict=True):
        ax.text(xi, r["wall_s"], f"{r['tok_s']:.0f} tok/s", ha="center", va="bottom", fontsize=8)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chunks", default="16,32,64", help="prompt chunk sizes to compare")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--max-batch-size", type=int, default=8)
    ap.add_argument("--requests", type=int, default=16, help="requests per run (8th ones long)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--out", type=Path, default=RESULTS / "serve_time_split.json")
    args = ap.parse_args()
    load = os.getloadavg()[0]
    engine = Engine.load()
    texts = request_prompts(args.requests, 8, (500, 1000, 1500))
    prompts = [engine.encode_chat([{"role": "user", "content": p.text}]) for p in texts]
    serve(engine, prompts[:2], 2, args.max_batch_size, 8)  # warm-up
    rows = []
    for chunk in (int(c) for c in args.chunks.split(",")):
        engine.prefill_chunk = chunk
        single = alone(engine, prompts, args.max_batch_size, args.max_tokens).summary()
        many = serve(engine, prompts, args.clients, args.max_batch_size, args.max_tokens).summary()
        row = {"chunk": chunk, "alone": single, "batched": many, **compare(single, many)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    result = {
        "settings": vars(args) | {"out": str(args.out)},
        "machine": {"cpu": cpu_model(), "load_at_start": load, "load_at_end": os.getloadavg()[0]},
        "prompt_tokens": [len(p) for p in prompts],
        "commit": git_commit(),
        "chunks": rows,
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
