"""Resident memory of this process from /proc/self/status (stdlib only: the llama.cpp runner
imports it from the benchmark-only environment, which has no mlx)."""

from __future__ import annotations

from pathlib import Path


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def process_rss() -> dict:
    """Peak (VmHWM) and current (VmRSS) resident bytes; None where /proc is unavailable."""
    hwm, rss = _status_kb("VmHWM"), _status_kb("VmRSS")
    return {
        "rss_peak_bytes": None if hwm is None else hwm * 1024,
        "rss_bytes": None if rss is None else rss * 1024,
    }
