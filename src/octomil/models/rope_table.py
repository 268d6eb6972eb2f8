"""Rotary position embedding from one table per step, shared by every layer (CPU decode speed).

``mx.fast.rope`` has no CPU kernel: its fallback rebuilds the frequencies, angles, sines and
cosines from scratch on every call, ~100 us per call here, two calls per layer: ~6 ms of a
~45 ms token on the embedded model. Every layer of a step rotates the same positions, so the
angles are computed once per (offset, length) and each layer applies them with one fused
kernel: ``x * cos + x[..., partner] * signed_sin``, where ``partner`` swaps the two halves of
each rotated pair (adjacent elements for the traditional layout, halves otherwise). The result
equals ``mx.fast.rope`` up to the rounding of one multiply-add (~1e-6).

Only plain ``nn.RoPE`` modules are replaced; scaled variants (Llama 3, YaRN, SuScaled) keep
their own implementation.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import mlx.core as mx
import mlx.nn as nn

# Distinct (offset, length) keys alive within one step: the token itself plus deferred
# catch-up rows joining at other depths (engine.catch_up.MAX_PENDING_ROWS = 4).
_TABLES_KEPT = 8


# Decode steps (one token plus catch-up rows) use the compiled kernel; prefill chunks of other
# lengths use the same operations unfused, so each new prompt length does not add a compilation.
COMPILED_MAX_ROWS = 8


def _rotate(x: mx.array, cos: mx.array, signed_sin: mx.array, partner: mx.array) -> mx.array:
    return x * cos + mx.take(x, partner, axis=-1) * signed_sin


_rotate_compiled = mx.compile(_rotate)


def rotate(x: mx.array, cos: mx.array, signed_sin: mx.array, partner: mx.array) -> mx.array:
    """Apply a table's rotation to ``x``; the fused kernel for decode-sized inputs."""
    rotate_ = _rotate_compiled if x.shape[-2] <= COMPILED_MAX_ROWS else _rotate
    return rotate_(x, cos, signed_sin, partner)


class RopeTables:
    """Per-model cache of (cos, signed sin, partner) tables keyed by offset, length, head size."""

    def __init__(self, dims: int, traditional: bool, base: float, scale: float):
        self.dims, self.traditional, self.base, self.scale = dims, traditional, base, scale
        self._tables: OrderedDict[tuple[int, int, int], tuple[mx.array, ...]] = OrderedDict()
        self._partners: dict[int, mx.array] = {}

    def get(self, offset: int, length: int, head_dim: int) -> tuple[mx.array, ...]:
        key = (offset, length, head_dim)
        found = self._tables.get(key)
        if found is None:
            found = self._tables[key] = self._table(offset, length, head_dim)
            if len(self._tables) > _TABLES_KEPT:
                self._tables.popitem(last=False)
        return found

    def rows(self, positions: tuple[int, ...], head_dim: int) -> tuple[mx.array, ...]:
        """Tables ``(n, head_dim)`` whose row ``i`` rotates one token at ``positions[i]``.

        Row ``i`` is exactly the table ``get(positions[i], 1, head_dim)``, so a token rotated among
        others gets the bits it gets alone.
        """
        if len(positions) == 1:
            return self.get(positions[0], 1, head_dim)
        key = (positions, -1, head_dim)
        found = self._tables.get(key)
        if found is None:
            # Singles are not kept: the row groups of one step (a batch past the route's row cap,
            # verifications) would evict each other's tables and recompute them every layer.
            singles = [
                self._tables.get((p, 1, head_dim)) or self._table(p, 1, head_dim) for p in positions
            ]
            found = self._tables[key] = (
                mx.concatenate([t[0] for t in singles]),
                mx.concatenate([t[1] for t in singles]),
                singles[0][2],
            )
            if len(self._tables) > _TABLES_KEPT:
                self._tables.popitem(last=False)
        return found

    def _table(self, offset: int, length: int, head_dim: int) -> tuple[mx.array, ...]:
        return (*self._angles(offset, length, head_dim), self._partner(head_dim))

    def _partner(self, head_dim: int) -> mx.array:
        if head_dim not in self._partners:
            d, half = self.dims, self.dims // 2
            pairs = (
                [i ^ 1 for i in range(d)] if self.traditional else [*range(half, d), *range(half)]
            )
            self._partners[head_dim] = mx.array(pairs + list(range(d, head_dim)), dtype=mx.uint32)
        return self._partners[head_dim]

    def _angles(self, offset: int, length: int, head_dim: int) -> tuple[mx.array, mx.array]:
        # MLX's own float32 steps (its rope fallback): exp(-i * ln(base) / half), then pos * freq;
        # base ** (-2i / dims) rounds differently, off by ~1e-3 at position 30000.
        half = self.dims // 2
        steps = mx.arange(0, -half, -1, dtype=mx.float32)
        inv_freq = mx.exp(steps * mx.array(math.log(self.base) / half, mx.float32))
        positions = mx.arange(offset, offset + length, dtype=mx.float32) * self.scale
        theta = positions[:, None] * inv_freq[None, :]
        cos, sin = mx.cos(theta), mx.sin(theta)
        if self.traditional:
            cos2 = mx.repeat(cos, 2, axis=-1)
            sin2 = mx.stack([-sin, sin], axis=-1).reshape(length, self.dims)
        else:
            cos2 = mx.concatenate([cos, cos], axis=-1)
            sin2 = mx.concatenate([-sin, sin], axis=-1)
        rest = head_dim - self.dims
        if rest:  # partial rotary: the remaining features pass through
            cos2 = mx.concatenate([cos2, mx.ones((length, rest))], axis=-1)
            sin2 = mx.concatenate([sin2, mx.zeros((length, rest))], axis=-1)
        return cos2, sin2


class TableRoPE(nn.Module):
    """Drop-in for ``nn.RoPE`` (same call signature) reading its angles from shared tables."""

    def __init__(self, original: nn.RoPE, tables: RopeTables):
        super().__init__()
        self.original = original
        self._tables = tables  # underscore: not a child module, not a parameter

    @property
    def tables(self) -> RopeTables:
        return self._tables

    def __call__(self, x: mx.array, offset: int = 0) -> mx.array:
        if not isinstance(offset, int) or x.shape[-1] < self._tables.dims:
            return self.original(x, offset=offset)  # batched (array) offsets: the stock path
        cos, sin, partner = self._tables.get(offset, x.shape[-2], x.shape[-1])
        if cos.dtype != x.dtype:
            cos, sin = cos.astype(x.dtype), sin.astype(x.dtype)
        return rotate(x, cos, sin, partner)


def install_table_rope(model: nn.Module) -> int:
    """Replace every plain ``nn.RoPE`` in ``model`` with a :class:`TableRoPE`; returns how many.

    Modules with the same settings share one table cache, so a step builds its angles once.
    """
    shared: dict[tuple, RopeTables] = {}
    replaced = 0
    for _, module in model.named_modules():
        rope = getattr(module, "rope", None)
        if type(rope) is not nn.RoPE or rope.dims % 2:
            continue
        key = (rope.dims, bool(rope.traditional), float(rope.base), float(rope.scale))
        if key not in shared:
            shared[key] = RopeTables(*key)
        module.rope = TableRoPE(rope, shared[key])
        replaced += 1
    return replaced
