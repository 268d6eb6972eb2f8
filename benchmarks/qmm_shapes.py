"""Where the compact kernel's time goes: bytes per second on each of the embedded model's product
shapes, 1-16 rows, fp32 / q8 / q4, against the machine's read bandwidth measured in the same run.

Per shape, one graph of 30 products (one per layer, distinct weights, so they stream from memory as
in decode; the 49152 x 576 head once) per format and row count, interleaved, best of ``--rounds``
(wall clock: the best round is the one least disturbed by other processes). fp32 runs Octomil's
rows kernel behind the BLAS route; q8 and q4 run ``octomil.quant`` with fp16 scales and biases
(the GGUF's layout). Bytes are codes + scales + biases (fp32: the weights).

    .venv/bin/python benchmarks/qmm_shapes.py    # ~2 min: results/qmm_shapes.json
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
from compact_bench import interleaved_best, read_bandwidth_gbs
from engine_bench import cpu_model, git_commit

from octomil.quant import kernel

HERE = Path(__file__).resolve().parent
# The separate projections, then the fused ones compact decode steps use (octomil.quant.fused:
# q/k/v as one 960-output product, gate/up as one of 3072).
SHAPES = {"q/o 576x576": (576, 576), "k/v 192x576": (192, 576), "gate/up 1536x576": (1536, 576),
          "down 576x1536": (576, 1536), "head 49152x576": (49152, 576),
          "fused qkv 960x576": (960, 576), "fused gate_up 3072x576": (3072, 576)}  # fmt: skip
ROWS = (1, 2, 4, 8, 16)
LAYERS = 30


def weights(n: int, k: int, copies: int) -> dict[str, list]:
    dense = [mx.random.normal((n, k)) * 0.05 for _ in range(copies)]
    out: dict[str, list] = {"float32": dense}
    for fmt, bits in (("q8", 8), ("q4", 4)):
        triples = [mx.quantize(w, group_size=32, bits=bits) for w in dense]
        out[fmt] = [(q, s.astype(mx.float16), b.astype(mx.float16)) for q, s, b in triples]
    mx.eval(out)
    return out


def nbytes(item) -> int:
    return sum(a.nbytes for a in item) if isinstance(item, tuple) else item.nbytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "qmm_shapes.json")
    args = ap.parse_args()
    bits = {"q8": 8, "q4": 4}
    table: dict[str, dict] = {}
    bandwidth = read_bandwidth_gbs()
    for name, (n, k) in SHAPES.items():
        w = weights(n, k, 1 if n > 10000 else LAYERS)
        fns, sizes = {}, {}
        for fmt, items in w.items():
            sizes[fmt] = sum(nbytes(item) for item in items)
            for rows in ROWS:
                x = mx.random.normal((rows, k))
                mx.eval(x)
                if fmt == "float32":
                    fns[(fmt, rows)] = lambda x=x, items=items: mx.eval([x @ d.T for d in items])
                else:
                    fns[(fmt, rows)] = lambda x=x, items=items, b=bits[fmt]: mx.eval(
                        [kernel.quantized_matmul(x, *t, 32, b) for t in items]
                    )
        best = interleaved_best(fns, args.rounds)
        products = 1 if n > 10000 else LAYERS
        table[name] = {
            fmt: {
                str(rows): {
                    "us_per_product": best[(fmt, rows)] / products * 1e6,
                    "gb_s": sizes[fmt] / best[(fmt, rows)] / 1e9,
                    "vs_one_row": best[(fmt, rows)] / best[(fmt, 1)],
                }
                for rows in ROWS
            }
            for fmt in w
        }
        table[name]["bytes_per_product"] = {f: s // products for f, s in sizes.items()}
        for fmt in w:
            cells = "  ".join(
                f"{r}: {v['us_per_product']:7.1f} us {v['gb_s']:5.1f} GB/s"
                for r, v in table[name][fmt].items()
            )
            print(f"{name:17s} {fmt:8s} {cells}", flush=True)
        del w, fns
    out = {
        "benchmark": "compact kernel per shape: bytes per second vs the read bandwidth (issue 14)",
        "command": "python benchmarks/qmm_shapes.py",
        "commit": git_commit(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": {
            "cpu": cpu_model(),
            "load_average_1m": os.getloadavg()[0],
            "note": "shared with other engineers' tests: noisy",
        },  # fmt: skip
        "kernel": kernel.describe(),
        "read_bandwidth_gbs": bandwidth,
        "rounds": args.rounds,
        "shapes": table,
    }
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"read bandwidth {bandwidth:.1f} GB/s; load {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
