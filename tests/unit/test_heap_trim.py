"""The heap trimmer gives free pages back to the OS (RSS falls), on its interval, till cancelled."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import os
import time

import pytest

from octomil.server import heap_trim
from octomil.server.heap_trim import HeapTrimmer

needs_glibc = pytest.mark.skipif(not heap_trim.available(), reason="no malloc_trim (not glibc)")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@needs_glibc
def test_trim_returns_free_pages_between_live_allocations() -> None:
    """The soak's case: memory freed below a live allocation stays resident until trimmed."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    chunk, count = 4000, 16_000  # 64 MB in chunks below the mmap threshold: they live in the heap
    heap_trim.trim()
    blocks = [libc.malloc(chunk) for _ in range(count)]
    for b in blocks:
        libc.memset(b, 1, chunk)  # touch: resident
    fence = libc.malloc(chunk)  # live above them: the heap's top cannot shrink past it
    libc.memset(fence, 1, chunk)
    for b in blocks:
        libc.free(b)
    held = _rss_bytes()
    assert heap_trim.trim()
    released = held - _rss_bytes()
    libc.free(fence)
    assert released > 0.75 * chunk * count, f"only {released / 1e6:.1f} MB given back"


@needs_glibc
def test_trimmer_runs_on_its_interval_until_cancelled() -> None:
    async def run_until(trimmer: HeapTrimmer, trims: int, timeout: float) -> float:
        start = time.monotonic()
        task = asyncio.create_task(trimmer.run())
        while trimmer.trims < trims and time.monotonic() - start < timeout:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return time.monotonic() - start

    trimmer = HeapTrimmer(0.05)
    elapsed = asyncio.run(run_until(trimmer, 3, timeout=30))
    assert trimmer.trims >= 3
    assert trimmer.trims <= elapsed / 0.05 + 1  # never more often than the interval
    never = HeapTrimmer(0)
    asyncio.run(asyncio.wait_for(never.run(), 1))  # returns at once
    assert never.trims == 0


def test_a_negative_interval_is_refused() -> None:
    with pytest.raises(ValueError, match="interval"):
        HeapTrimmer(-1)
