"""A decode step's attention for all its sequences in one kernel call.

On this CPU a decode step of B sequences is not bound by its matrix products once they read the
weights once for all rows (``octomil.engine.ragged``): it is bound by MLX's element-at-a-time
``exp`` (SiLU, softmax) and by the ~20 operations per sequence and layer of the family's own
attention code (reshapes, RoPE, cache update, the fallback attention of a CPU without an SDPA
kernel). Measured on the embedded model at 16 sequences: SiLU ~60 ms and attention ~100 ms of a
~250 ms step (SiLU runs on the kernels through ``octomil.models.kernel_modules``). Here, for plain
families (``kernel_modules.PLAIN_ATTENTION`` with table RoPE and plain ``KVCache`` caches), the
sequences of a step share their attention: RoPE rotates all rows at once with each row's own angles
(``RopeTables.rows``), and one kernel call writes each sequence's new keys and values into its own
cache and attends every query row to its own sequence's cache up to its own position. A segment
may have several rows (catch-up rows, a verification of drafted tokens); each row is computed
exactly as if it were decoded alone at its position.

Invariant: the kernels compute every row and every sequence with the same code whatever shares
the call, and every decode step goes through here (alone too), so neither batching nor verifying
several rows at once changes a sequence's output. Against stock mlx-lm the numbers differ by float
rounding (the kernels' own exp and summation order; ~1e-6 relative), which decides no greedy token
in the parity tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import KVCache

from octomil.kernels import decode
from octomil.models.kernel_modules import PLAIN_ATTENTION
from octomil.models.rope_table import TableRoPE

# A decode step's segment: one token, catch-up rows, or a verification (``engine.verify``).
MAX_SEGMENT_ROWS = 32


def eligible(attention: nn.Module, rows: int, cache: Any, dtype: mx.Dtype) -> bool:
    """Whether a decode-step segment of ``rows`` rows of ``dtype`` with ``cache`` attends through
    the kernel (float32 only: --dtype bfloat16/float16 keep the family's code)."""
    return (
        rows <= MAX_SEGMENT_ROWS
        and dtype == mx.float32
        and type(cache) is KVCache
        and isinstance(attention, PLAIN_ATTENTION)
        and isinstance(attention.rope, TableRoPE)
        and decode.extension() is not None
    )


def attend(
    attention: nn.Module,
    queries: mx.array,
    keys: mx.array | None,
    values: mx.array | None,
    rows: Sequence[int],
    caches: Sequence[Any],
) -> mx.array:
    """Attention outputs ``(1, R, heads * head_dim)`` for segments of ``rows`` consecutive new
    positions each, one per cache (a plain ``KVCache``, updated here).

    ``queries``/``keys``/``values`` are the projected rows, segment by segment: ``(1, R, features)``
    as the projections return them, or ``(R, features)``. The kernel takes them as they are and
    rotates and scales them itself from the step's RoPE tables, so a layer's attention is one
    graph node (MLX spends a few microseconds of scheduling on every node of a step's graph).
    ``keys`` and ``values`` None: ``queries`` is a fused q/k/v product, each row's q, k and v
    after each other (``octomil.quant.fused``).
    """
    total = sum(rows)
    kv_heads = attention.n_kv_heads
    if keys is None:
        head_dim = queries.shape[-1] // (attention.n_heads + 2 * kv_heads)
    else:
        head_dim = keys.shape[-1] // kv_heads
    positions = tuple(c.offset + j for c, n in zip(caches, rows, strict=True) for j in range(n))
    cos, sin, partner = attention.rope.tables.rows(positions, head_dim)
    for cache, n in zip(caches, rows, strict=True):
        _reserve_rows(cache, n, kv_heads, head_dim, head_dim)
    out, *buffers = decode.extension().decode_attention(  # type: ignore[union-attr]
        queries,
        keys,
        values,
        [c.keys for c in caches],
        [c.values for c in caches],
        list(rows),
        [c.offset + n for c, n in zip(caches, rows, strict=True)],
        attention.scale,
        [cos, sin, partner],
    )
    for i, (cache, n) in enumerate(zip(caches, rows, strict=True)):  # the kernel wrote the rows
        cache.keys, cache.values = buffers[i], buffers[len(caches) + i]
        cache.offset += n
    return out if out.ndim == 3 else out.reshape(1, total, -1)


def _reserve_rows(cache: KVCache, n: int, kv_heads: int, k_dim: int, v_dim: int) -> None:
    """Grow ``cache``'s buffers, as ``KVCache.update_and_fetch`` would, if ``n`` more rows do not
    fit; the rows themselves are written by the kernel."""
    prev = cache.offset
    if cache.keys is not None and prev + n <= cache.keys.shape[2]:
        return
    steps = -(-n // cache.step) * cache.step
    new_k = mx.zeros((1, kv_heads, steps, k_dim))
    new_v = mx.zeros((1, kv_heads, steps, v_dim))
    if cache.keys is None:
        cache.keys, cache.values = new_k, new_v
        return
    keys, values = cache.keys[..., :prev, :], cache.values[..., :prev, :]
    cache.keys = mx.concatenate([keys, new_k], axis=2)
    cache.values = mx.concatenate([values, new_v], axis=2)
