"""MLX's memory figures (bytes) for monitoring: arrays alive, the allocator's cache, the peak.

The cache holds freed buffers for reuse; it grows to a plateau set by the largest shapes seen
(batch size, prompt chunk, context), so resident memory rises during warm-up without a leak.
"""

from __future__ import annotations

import mlx.core as mx


def active_bytes() -> int:
    return int(mx.get_active_memory())


def cache_bytes() -> int:
    return int(mx.get_cache_memory())


def peak_bytes() -> int:
    return int(mx.get_peak_memory())
