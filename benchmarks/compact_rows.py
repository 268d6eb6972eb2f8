"""Few-row products on compact weights: do 2-16 rows still share one read of the weights?

For 1, 2, 4, 8, 16 and 32 rows, one graph of the embedded model's 30 gate projections (1536 x 576
each, all layers, so the weights stream from memory as in decode) per format: float32 (Octomil's
fp32 rows kernel behind the BLAS route), q8 and q4 (``octomil.quant``). Formats and row counts
interleaved, best of ``--rounds``; ms per graph and the cost relative to one row of the same format.

    .venv/bin/python benchmarks/compact_rows.py    # ~1 min: results/compact_rows.json
"""

from __future__ import annotations

import octomil  # noqa: F401  (first: OpenBLAS and the BLAS route load before mlx)

# isort: split
import argparse
import json
import os
import time
from pathlib import Path

import mlx.core as mx
from compact_bench import interleaved_best
from engine_bench import cpu_model, git_commit

from octomil.models.loader import load
from octomil.quant import kernel

HERE = Path(__file__).resolve().parent
ROWS = (1, 2, 4, 8, 16, 32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "compact_rows.json")
    args = ap.parse_args()

    layers = load(None, dtype="q4").model.model.layers
    gates = [layer.mlp.gate_proj for layer in layers]
    triples = {"q4": [(g.weight, g.scales, g.biases) for g in gates]}
    # fp32 weights for the fp32 path (the q4 scales are the GGUF's fp16); q8 keeps fp16 scales.
    dense = [mx.dequantize(*t, group_size=32, bits=4).astype(mx.float32) for t in triples["q4"]]
    triples["q8"] = [
        tuple(a.astype(mx.float16) if a.dtype == mx.float32 else a for a in mx.quantize(w, 32, 8))
        for w in dense
    ]
    mx.eval(dense, triples)
    bits = {"q4": 4, "q8": 8}

    def graph(fmt: str, x: mx.array):
        if fmt == "float32":
            return lambda: mx.eval([x @ w.T for w in dense])
        return lambda: mx.eval(
            [kernel.quantized_matmul(x, *t, 32, bits[fmt]) for t in triples[fmt]]
        )

    fns = {
        (fmt, rows): graph(fmt, mx.random.normal((rows, 576)))
        for fmt in ("float32", "q8", "q4")
        for rows in ROWS
    }
    best = {key: s * 1000 for key, s in interleaved_best(fns, args.rounds).items()}  # ms
    table = {
        fmt: {
            str(rows): {"ms": best[(fmt, rows)], "vs_one_row": best[(fmt, rows)] / best[(fmt, 1)]}
            for rows in ROWS
        }
        for fmt in ("float32", "q8", "q4")
    }
    out = {
        "benchmark": "compact few-row products: 30 gate projections 1536x576 per graph",
        "commit": git_commit(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": {"cpu": cpu_model(), "note": "shared with other engineers' tests: noisy"},
        "kernel": kernel.describe(),
        "load_average_1m": os.getloadavg()[0],
        "rounds": args.rounds,
        "ms_per_graph": table,
    }
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    for fmt, per in table.items():
        cells = "  ".join(
            f"{r}: {v['ms']:6.2f} ms ({v['vs_one_row']:.2f}x)" for r, v in per.items()
        )
        print(f"{fmt:8s} {cells}")


if __name__ == "__main__":
    main()
