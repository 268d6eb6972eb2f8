"""Is the soak's RSS growth a leak? Serve in-process and count what grows with requests.

Runs the soak's server configuration (embedded model, balanced preset on the raw head, shadow
checks at 0.1) in this process (uvicorn on a thread) and drives it with the soak's request mix
(``soak.one``). After a warm-up it takes three snapshots ``--step`` requests apart, each after
``gc.collect()``: RSS, MLX active/cache memory, Python objects by type, and (``--tracemalloc``)
Python allocations by line. Something that grows by about the same amount between snapshots 1->2
and 2->3 grows with the request count (a leak); a one-off rise that stops is a cache filling up.

Run: ``nice -n 10 .venv/bin/python benchmarks/leak_probe.py --warmup 30 --step 120``.
"""

import octomil  # noqa: F401, I001 - must precede mlx (BLAS preload)

import argparse
import gc
import json
import os
import random
import sys
import threading
import tracemalloc
from collections import Counter
from pathlib import Path

import httpx
import mlx.core as mx
import uvicorn

sys.path.insert(0, str(Path(__file__).parent))
from soak import free_port, one, rss_bytes, wait_healthy  # noqa: E402

from octomil.config import resolve_early_exit  # noqa: E402
from octomil.engine.engine import Engine  # noqa: E402
from octomil.server.app import create_app  # noqa: E402
from octomil.server.engine_client import EngineClient  # noqa: E402
from octomil.server.serving import ServeOptions  # noqa: E402


def snapshot(trace: bool) -> dict:
    gc.collect()
    types = Counter(type(o).__name__ for o in gc.get_objects())
    return {
        "rss_mb": round(rss_bytes(os.getpid()) / 2**20, 1),
        "mlx_active_mb": round(mx.get_active_memory() / 2**20, 1),
        "mlx_cache_mb": round(mx.get_cache_memory() / 2**20, 1),
        "objects": sum(types.values()),
        "types": types,
        "trace": tracemalloc.take_snapshot() if trace else None,
    }


def drive(base: str, n: int, clients: int, seed: int) -> Counter:
    """``n`` requests of the soak's mix from ``clients`` threads; statuses and errors."""
    left = [n]
    lock = threading.Lock()
    tally: Counter = Counter()

    def worker(k: int) -> None:
        rng = random.Random(seed * 100 + k)
        with httpx.Client(base_url=base, timeout=120) as client:
            while True:
                with lock:
                    if left[0] == 0:
                        return
                    left[0] -= 1
                s, e = Counter(), Counter()
                one(client, rng, s, e)
                with lock:
                    tally.update(s)
                    tally.update({f"ERROR {k}": v for k, v in e.items()})

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return tally


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--step", type=int, default=120)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--tracemalloc", action="store_true")
    args = ap.parse_args()
    if args.tracemalloc:
        tracemalloc.start(8)

    def load() -> Engine:
        return Engine.load(early_exit=resolve_early_exit("balanced"), exit_policy="lens")

    client = EngineClient(load, max_concurrency=16)
    app = create_app(client, options=ServeOptions(shadow_rate=0.1, max_concurrency=16))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    if not wait_healthy(base):
        raise SystemExit(f"the server at {base} did not become healthy")
    tallies = [drive(base, args.warmup, args.clients, 0)]
    snaps = [snapshot(args.tracemalloc)]
    for k in (1, 2):
        tallies.append(drive(base, args.step, args.clients, k))
        snaps.append(snapshot(args.tracemalloc))
    server.should_exit = True
    thread.join(timeout=30)
    for a, b, tally in zip(snaps, snaps[1:], tallies[1:], strict=False):
        grew = {t: b["types"][t] - a["types"][t] for t in b["types"]}
        top = sorted(((d, t) for t, d in grew.items() if d), reverse=True)[:15]
        print(
            json.dumps(
                {
                    k: (b[k], round(b[k] - a[k], 1))
                    for k in ("rss_mb", "mlx_active_mb", "mlx_cache_mb", "objects")
                }
            )
        )
        print("  requests:", dict(sorted(tally.items())))
        print("  object types that grew:", top)
        if a["trace"] is not None:
            for stat in b["trace"].compare_to(a["trace"], "lineno")[:12]:
                print("   ", stat)


if __name__ == "__main__":
    main()
