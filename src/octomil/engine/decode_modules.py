"""A decode step's attention for all its one-token sequences in one kernel call.

On this CPU a decode step of B sequences is not bound by its matrix products once they read the
weights once for all rows (``octomil.engine.ragged``): it is bound by MLX's element-at-a-time
``exp`` (SiLU, softmax) and by the ~20 operations per sequence and layer of the family's own
attention code (reshapes, RoPE, cache update, the fallback attention of a CPU without an SDPA
kernel). Measured on the embedded model at 16 sequences: SiLU ~60 ms and attention ~100 ms of a
~250 ms step (SiLU runs on the kernels through ``octomil.models.kernel_modules``). Here, for plain
families (``kernel_modules.PLAIN_ATTENTION`` with table RoPE and plain ``KVCache`` caches), the
one-token sequences of a step share their attention: RoPE rotates all rows at once with each row's
own angles (``RopeTables.rows``), and one kernel call writes each sequence's new key and value
into its own cache and attends every query to its own sequence's cache.

Invariant: the kernels compute every row and every sequence with the same code whatever shares
the call, and every decode step goes through here (alone too), so batching never changes a
sequence's output. Against stock mlx-lm the numbers differ by float rounding (the kernels' own
exp and summation order; ~1e-6 relative), which decides no greedy token in the parity tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import KVCache

from octomil.kernels import decode
from octomil.models.kernel_modules import PLAIN_ATTENTION
from octomil.models.rope_table import TableRoPE, rotate


def eligible(attention: nn.Module, rows: int, cache: Any) -> bool:
    """Whether a segment of ``rows`` rows with ``cache`` attends through the kernel."""
    return (
        rows == 1
        and type(cache) is KVCache
        and isinstance(attention, PLAIN_ATTENTION)
        and isinstance(attention.rope, TableRoPE)
        and decode.extension() is not None
    )


def attend(
    attention: nn.Module, queries: mx.array, keys: mx.array, values: mx.array, caches: Sequence[Any]
) -> mx.array:
    """Attention outputs ``(1, n, heads * head_dim)`` for ``n`` one-token sequences.

    ``queries``/``keys``/``values`` are the projected rows ``(n, features)`` in the order of
    ``caches`` (one plain ``KVCache`` each, updated here).
    """
    n = len(caches)
    heads, kv_heads = attention.n_heads, attention.n_kv_heads
    q = queries.reshape(n, heads, 1, -1)  # (n, H, 1, hd)
    k = keys.reshape(n, kv_heads, 1, -1)
    v = values.reshape(n, kv_heads, 1, -1)
    head_dim = q.shape[-1]
    cos, sin, partner = attention.rope.tables.rows(tuple(c.offset for c in caches), head_dim)
    cos, sin = cos[:, None, None, :], sin[:, None, None, :]  # (n, 1, 1, hd)
    q, k = rotate(q, cos, sin, partner), rotate(k, cos, sin, partner)
    for cache in caches:
        _reserve_row(cache, k.shape[1], head_dim, v.shape[-1])
    out, *buffers = decode.extension().decode_attention(  # type: ignore[union-attr]
        q.reshape(n, heads, head_dim),
        k.reshape(n, kv_heads, head_dim),
        v.reshape(n, kv_heads, -1),
        [c.keys for c in caches],
        [c.values for c in caches],
        [c.offset + 1 for c in caches],
        attention.scale,
    )
    for i, cache in enumerate(caches):  # the kernel wrote each sequence's new row
        cache.keys, cache.values = buffers[i], buffers[n + i]
        cache.offset += 1
    return out.reshape(1, n, heads * head_dim)


def _reserve_row(cache: KVCache, kv_heads: int, k_dim: int, v_dim: int) -> None:
    """Grow ``cache``'s buffers, as ``KVCache.update_and_fetch`` would, if one more row does not
    fit; the row itself is written by the kernel."""
    prev = cache.offset
    if cache.keys is not None and prev + 1 <= cache.keys.shape[2]:
        return
    new_k = mx.zeros((1, kv_heads, cache.step, k_dim))
    new_v = mx.zeros((1, kv_heads, cache.step, v_dim))
    if cache.keys is None:
        cache.keys, cache.values = new_k, new_v
        return
    keys, values = cache.keys[..., :prev, :], cache.values[..., :prev, :]
    cache.keys = mx.concatenate([keys, new_k], axis=2)
    cache.values = mx.concatenate([values, new_v], axis=2)
