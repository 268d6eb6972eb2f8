"""Memory gauges on ``/metrics``: the process's resident memory and MLX's own accounting.

Read at scrape time. With both, a rise in RSS can be told apart: MLX arrays (``active``), MLX's
buffer cache filling up to its plateau (``cache``), or the rest of the process (Python objects,
malloc). ``benchmarks/soak.py`` judges flat memory from these.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.process_collector import ProcessCollector

from octomil.engine import memory


def watch(registry: CollectorRegistry, model: str) -> None:
    """Export ``process_*`` (RSS, CPU, fds) and ``octomil_mlx_{active,cache,peak}_memory_bytes``."""
    ProcessCollector(registry=registry)
    for name, read, what in (
        ("active", memory.active_bytes, "MLX arrays alive"),
        ("cache", memory.cache_bytes, "MLX's cache of freed buffers kept for reuse"),
        ("peak", memory.peak_bytes, "MLX's peak of active memory since start"),
    ):
        gauge = Gauge(
            f"octomil_mlx_{name}_memory_bytes", f"{what} (bytes).", ["model"], registry=registry
        )
        gauge.labels(model).set_function(read)
