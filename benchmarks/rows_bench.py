"""Few-row fp32 products: Octomil's rows kernel vs one sgemv per row vs OpenBLAS and BLIS sgemm.

What continuous batching needs: a product of R rows (one per sequence in a decode step) should
cost about what one row costs, since decoding is bound by reading the weights. For each projection
shape of the embedded model and its LM head, in mlx's (out, in) storage as the engine uses it
(y = x W^T, ``CblasTrans``), and for the layer shapes also in (in, out) storage (y = x W), this
times one product of 1, 2, 4, 8, 16 and 32 rows through:

- ``rows``: Octomil's rows kernel (``octomil.blas``; direct entry, also past ``max_rows()``);
- ``sgemv``: one OpenBLAS sgemv per row (the previous route);
- ``openblas``: OpenBLAS's sgemm (what MLX calls without the route);
- ``blis``: BLIS's sgemm (Debian ``libblis4-pthread``), when installed, 2 threads, loaded with
  ``RTLD_DEEPBIND`` so its internal calls do not resolve to the preloaded OpenBLAS.

Weights are streamed from memory, as in decoding (the model is 538 MB): the products cycle
through enough copies of the matrix to exceed the last-level cache. Variants are interleaved in a
random order within each round, each woken by two untimed products before its timing, best of
``--rounds``; the load average is recorded.
Writes ``results/rows.json`` and ``results/rows.png``. Bounded: ~1-2 min on 2 cores.

    .venv/bin/python benchmarks/rows_bench.py
"""

from __future__ import annotations

import os

os.environ.setdefault("BLIS_NUM_THREADS", "2")  # read by BLIS when it is loaded

import octomil  # noqa: E402, F401  first: loads OpenBLAS and the route

# isort: split
import argparse  # noqa: E402
import ctypes  # noqa: E402
import datetime as dt  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from rows_render import NAMES, readme_table  # noqa: E402

from octomil import blas  # noqa: E402
from octomil.blas import route  # noqa: E402

RESULTS = Path(__file__).parent / "results"
BLIS = "/usr/lib/x86_64-linux-gnu/blis-pthread/libblis.so.4"
ROWS = (1, 2, 4, 8, 16, 32)
# (name, in, out) of the embedded model (SmolLM2-135M): hidden 576, 3 KV heads of 64, MLP 1536.
LAYERS = (("q/o", 576, 576), ("k/v", 576, 192), ("gate/up", 576, 1536), ("down", 1536, 576))
HEAD = ("head", 576, 49152)
STREAM_BYTES = 96 << 20  # per shape: several times the last-level cache of the machines seen
TIMING_S = 0.004  # products per timing: about this long (one, when a product takes longer)
ROW_MAJOR, NO_TRANS, TRANS = 101, 111, 112

Product = Callable[[int, int, int, int, object, object, object], None]


# cblas_sgemm's arguments after its integer flags and sizes: alpha, a, lda, b, ldb, beta, c, ldc.
_GEMM_ARGS = [
    ctypes.c_float,
    ctypes.c_void_p,
    ctypes.c_int,
    ctypes.c_void_p,
    ctypes.c_int,
    ctypes.c_float,
    ctypes.c_void_p,
    ctypes.c_int,
]


def _sgemm(function: ctypes._CFuncPtr) -> Product:
    """A product through a cblas_sgemm-shaped function: c (m, n) = x (m, k) . op(w)."""
    function.restype = None
    function.argtypes = [ctypes.c_int] * 6 + _GEMM_ARGS

    def run(trans_b: int, m: int, n: int, k: int, x: object, w: object, c: object) -> None:
        ldb = k if trans_b == TRANS else n
        function(ROW_MAJOR, NO_TRANS, trans_b, m, n, k, 1.0, x, k, w, ldb, 0.0, c, n)

    return run


def _direct(function: ctypes._CFuncPtr) -> Product:
    """A product through one of the route's direct entries (no order argument)."""
    function.argtypes = [ctypes.c_int] * 5 + _GEMM_ARGS

    def run(trans_b: int, m: int, n: int, k: int, x: object, w: object, c: object) -> None:
        ldb = k if trans_b == TRANS else n
        function(NO_TRANS, trans_b, m, n, k, 1.0, x, k, w, ldb, 0.0, c, n)

    return run


def variants() -> dict[str, Product]:
    if not route.active():
        raise SystemExit(f"the route is not active: {route.reason()}")
    shim = route.library()
    openblas = ctypes.CDLL(blas.preload() or "", mode=ctypes.RTLD_LOCAL)
    found = {
        "rows": _direct(shim.octomil_rows_sgemm),
        "sgemv": _direct(shim.octomil_sgemv_rows),
        "openblas": _sgemm(openblas.cblas_sgemm),
    }
    if os.path.exists(BLIS):
        library = ctypes.CDLL(BLIS, mode=ctypes.RTLD_LOCAL | os.RTLD_DEEPBIND)
        found["blis"] = _sgemm(library.cblas_sgemm)
    return found


def time_shape(
    products: dict[str, Product], k: int, n: int, trans_b: int, rows: tuple[int, ...], rounds: int
) -> dict[str, dict[int, float]]:
    """Best ms per product for each variant and row count, weights streamed from memory."""
    rng = np.random.default_rng(0)
    copies = max(1, STREAM_BYTES // (4 * k * n))
    shape = (n, k) if trans_b == TRANS else (k, n)
    weights = [rng.standard_normal(shape, dtype=np.float32) for _ in range(copies)]
    x = rng.standard_normal((max(rows), k), dtype=np.float32)
    c = np.empty((max(rows), n), dtype=np.float32)
    pointers = [w.ctypes.data for w in weights]
    cursor = 0  # one cycle through the copies: each product finds its weights out of cache

    def timed(run: Product, m: int, count: int) -> float:
        nonlocal cursor
        start = time.perf_counter()
        for _ in range(count):
            run(trans_b, m, n, k, x.ctypes.data, pointers[cursor], c.ctypes.data)
            cursor = (cursor + 1) % copies
        return (time.perf_counter() - start) / count

    best: dict[str, dict[int, float]] = {name: {} for name in products}
    counts = {
        (name, m): max(1, int(TIMING_S / timed(products[name], m, 1)))
        for name in products
        for m in rows
    }
    order = np.random.default_rng(1)
    for _ in range(rounds):
        for m in rows:
            # A random order: another library's thread pool still spinning after its call slows
            # whatever runs next, so no variant may always follow the same one.
            for name in order.permutation(list(products)):
                timed(products[name], m, 2)  # wakes this variant's threads
                ms = timed(products[name], m, counts[name, m]) * 1e3
                best[name][m] = min(best[name].get(m, float("inf")), ms)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--out", type=Path, default=RESULTS / "rows.json")
    parser.add_argument("--no-layout-in-out", action="store_true", help="(out, in) storage only")
    parser.add_argument("--rows", default=",".join(map(str, ROWS)), help="row counts, e.g. 1,8,64")
    args = parser.parse_args()
    products = variants()
    rows = tuple(int(m) for m in args.rows.split(","))
    load_before = os.getloadavg()
    started = time.perf_counter()
    cases = [(name, k, n, "out_in") for name, k, n in (*LAYERS, HEAD)]
    if not args.no_layout_in_out:
        cases += [(name, k, n, "in_out") for name, k, n in LAYERS]
    results = []
    for name, k, n, layout in cases:
        trans_b = TRANS if layout == "out_in" else NO_TRANS
        ms = time_shape(products, k, n, trans_b, rows, args.rounds)
        results.append({"shape": name, "in": k, "out": n, "layout": layout, "ms": ms})
        one = ms["rows"][rows[0]]
        line = "  ".join(f"{m}:{ms['rows'][m]:.3f}({ms['rows'][m] / one:.1f}x)" for m in rows)
        print(f"{name:8s} {k}x{n} {layout}: rows kernel {line}", flush=True)
    record = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "command": "python benchmarks/rows_bench.py",
        "machine": {
            "cpu": _cpu_name(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "blas": blas.describe(),
            "isa": route.isa(),
            "max_rows": route.max_rows(),
        },
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "seconds": round(time.perf_counter() - started, 1),
        "rounds": args.rounds,
        "stream_bytes": STREAM_BYTES,
        "rows": list(rows),
        "variants": list(products),
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    record = json.loads(args.out.read_text())  # row counts as JSON keys, as the renderers read them
    _plot(record, args.out.with_suffix(".png"))
    print(f"wrote {args.out} ({record['seconds']} s, load {load_before[0]:.2f})")
    if {"1", "8"} <= set(record["results"][0]["ms"]["rows"]):
        print(readme_table(record))


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def _plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = record["results"]
    fig, axes = plt.subplots(2, (len(results) + 1) // 2, figsize=(4 * ((len(results) + 1) // 2), 7))
    for ax, result in zip(axes.flat, results, strict=False):
        for name in record["variants"]:
            series = result["ms"][name]
            ax.plot([int(m) for m in series], list(series.values()), marker="o", label=NAMES[name])
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{result['shape']} {result['in']}x{result['out']} ({result['layout']})")
        ax.set_xlabel("rows")
        ax.set_ylabel("ms per product")
        ax.grid(True, alpha=0.3)
    for ax in list(axes.flat)[len(results) :]:
        ax.axis("off")
    axes.flat[0].legend()
    machine = record["machine"]
    fig.suptitle(
        f"Few-row fp32 products, weights streamed from memory: {machine['cpu']}, "
        f"{machine['cores']} cores, load {record['load_average_before'][0]:.2f}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
