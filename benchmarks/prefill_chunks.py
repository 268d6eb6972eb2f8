"""Prompt reading, chunk by chunk: what one 32-token chunk costs at each position of a long prompt.

Serving reads prompts in chunks of ``--max-prefill-tokens-per-step`` tokens (32), and that reading
bounds how far batching can raise throughput (README, "Serving benchmark"). A chunk's products
cost the same at every position; its attention over the prompt read so far grows with the
position. This feeds a ``--tokens``-token prompt to one sequence of the embedded model (full depth,
fp32, the engine's own layer loop) a chunk at a time, evaluating each, and records the wall time
of every chunk, best of ``--rounds`` fresh sequences. Writes ``results/prefill_chunks.json`` and
``.png``. ~1 min on 2 cores.

    .venv/bin/python benchmarks/prefill_chunks.py
"""

from __future__ import annotations

import octomil  # noqa: F401  (first: OpenBLAS and the BLAS route load before mlx)

# isort: split
import argparse
import json
import os
import time
from pathlib import Path

from octomil.engine.engine import Engine
from octomil.engine.layer_loop import LayerLoop

HERE = Path(__file__).parent
DEFAULT_OUT = HERE / "results" / "prefill_chunks.json"


def chunk_times(engine: Engine, tokens: list[int], chunk: int) -> list[float]:
    """Milliseconds of each chunk's feed (evaluated) for one fresh sequence."""
    loop = LayerLoop(engine.loaded.anatomy, engine.loaded.model)
    times = []
    for start in range(0, len(tokens), chunk):
        t = time.perf_counter()
        loop.feed(tokens[start : start + chunk])  # evaluates the chunk's KV before returning
        times.append((time.perf_counter() - t) * 1e3)
    return times


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.2))
    ax.plot(record["positions"], record["chunk_ms"], marker=".")
    ax.set_xlabel("position of the chunk's first token")
    ax.set_ylabel(f"ms per {record['chunk']}-token chunk (best of {record['rounds']})")
    ax.set_title("prompt reading: one chunk's cost by position (embedded model, fp32)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=1536, help="prompt length")
    ap.add_argument("--chunk", type=int, default=32, help="tokens per chunk (the serving default)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()
    load_before = os.getloadavg()[0]
    engine = Engine.load(dtype="float32")
    tokens = [1000 + (i * 7919) % 40000 for i in range(args.tokens)]  # ids, not a text
    chunk_times(engine, tokens[: 4 * args.chunk], args.chunk)  # warm-up
    rounds = [chunk_times(engine, tokens, args.chunk) for _ in range(args.rounds)]
    best = [min(r[i] for r in rounds) for i in range(len(rounds[0]))]
    positions = list(range(0, args.tokens, args.chunk))
    total = sum(best) / 1e3
    record = {
        "command": "python benchmarks/prefill_chunks.py "
        + f"--tokens {args.tokens} --chunk {args.chunk} --rounds {args.rounds}",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "engine": engine.selection,
        "load_average": [load_before, os.getloadavg()[0]],
        "tokens": args.tokens,
        "chunk": args.chunk,
        "rounds": args.rounds,
        "positions": positions,
        "chunk_ms": [round(t, 2) for t in best],
        "first_chunk_ms": round(best[0], 2),
        "last_chunk_ms": round(best[-1], 2),
        "prompt_tok_s": round(args.tokens / total, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    plot(record, args.out.with_suffix(".png"))
    print(
        f"chunk of {args.chunk} at position 0: {best[0]:.0f} ms, at {positions[-1]}: "
        f"{best[-1]:.0f} ms; {record['prompt_tok_s']} prompt tok/s over {args.tokens} tokens"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
