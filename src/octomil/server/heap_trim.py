"""Hand the C heap's free pages back to the OS, so resident memory follows what is in use.

glibc keeps freed memory in its arenas for reuse and returns it only from the top of the heap.
A server's allocations come and go in many sizes (a long prompt's chunks, a larger batch, the
tokenizer's and the grammar matcher's buffers), so freed pages stay resident between live ones
and RSS climbs, step by step, to the high-water mark of everything ever allocated at once:
``benchmarks/soak.py`` saw +28 MB over a 20-minute soak's judged half while MLX's own arrays and
buffer cache did not grow. ``malloc_trim(0)`` releases every whole free page in every arena
(``madvise(MADV_DONTNEED)``), without moving a live allocation.

:class:`HeapTrimmer` calls it on a worker thread every ``interval`` seconds. Where the C library
has no ``malloc_trim`` (macOS, musl) it does nothing.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
from collections.abc import Callable

DEFAULT_INTERVAL_S = 10.0


def _load_malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        fn = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError, TypeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


_MALLOC_TRIM = _load_malloc_trim()


def available() -> bool:
    """Whether this C library can give free heap pages back (glibc)."""
    return _MALLOC_TRIM is not None


def trim() -> bool:
    """Give every whole free page of the heap back to the OS; True when some memory was."""
    return bool(_MALLOC_TRIM(0)) if _MALLOC_TRIM is not None else False


class HeapTrimmer:
    """Trim the heap every ``interval`` seconds while the server runs (0: never)."""

    def __init__(self, interval: float = DEFAULT_INTERVAL_S) -> None:
        if interval < 0:
            raise ValueError(f"interval must be >= 0, got {interval}")
        self.interval = interval
        self.trims = 0

    def _trim(self) -> None:
        trim()
        self.trims += 1

    async def run(self) -> None:
        """Trim until cancelled; a thread does the work so the event loop never waits on it."""
        if not self.interval or not available():
            return
        while True:
            await asyncio.sleep(self.interval)
            await asyncio.to_thread(self._trim)
