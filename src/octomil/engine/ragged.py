"""One decoder layer over the rows of several sequences: one read of the weights for all of them.

Decoding is bound by memory bandwidth on this CPU: every product reads a whole weight matrix for
one row. When several sequences decode together, their rows are concatenated into one hidden
state ``(1, R, D)`` and every *row-wise* part of the layer (norms, the q/k/v and output
projections, the MLP, residuals) runs once for all rows. Attention is the only part that mixes
rows, and it must only mix rows of the same sequence, against that sequence's own KV cache. So the
layer runs with its attention module swapped for :class:`_RaggedAttention`, which computes the
input projections once for all rows and then calls the family's *own* attention code once per
sequence, on that sequence's slice, with its projections standing in as precomputed slices and its
output projection deferred to one product for all rows. The family's RoPE, q/k norms, GQA, soft-caps
and cache update are therefore exactly the code a sequence decoded alone runs.

Invariant: each sequence's rows see exactly the computation they would alone — the same per-row
products (the few-row product route computes each row independently of the others in the call,
see ``octomil.blas``), the same attention over the same cache. So batching never changes a
sequence's output.

Families whose attention does not fit this shape (no ``q_proj``/``k_proj``/``v_proj`` or
``qkv_proj`` plus ``o_proj``) run the layer once per sequence (:func:`supports_ragged` is False).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from octomil.engine.decode_modules import attend, eligible
from octomil.quant.fused import fused_of

_INPUT_PROJECTIONS = (("q_proj", "k_proj", "v_proj"), ("qkv_proj",))


@dataclass(frozen=True)
class Segment:
    """The rows ``start:stop`` of the batch belong to one sequence, with its cache and mask."""

    start: int
    stop: int
    cache: Any
    mask: Any


def _input_projections(attention: nn.Module) -> tuple[str, ...] | None:
    for names in _INPUT_PROJECTIONS:
        if all(n in attention for n in names) and "o_proj" in attention:
            return names
    return None


def supports_ragged(layer: nn.Module) -> bool:
    attention = getattr(layer, "self_attn", None)
    return isinstance(attention, nn.Module) and _input_projections(attention) is not None


class _Rows(nn.Module):
    """Stands in for a projection: returns its precomputed rows of the current segment."""

    def __init__(self, full: mx.array) -> None:
        super().__init__()
        self._full = full
        self.span = (0, 0)

    def __call__(self, x: mx.array) -> mx.array:
        a, b = self.span
        return self._full[:, a:b]


class _Identity(nn.Module):
    def __call__(self, x: mx.array) -> mx.array:
        return x


class _RaggedAttention(nn.Module):
    """Replaces a layer's ``self_attn`` for one call; see the module docstring."""

    def __init__(self, attention: nn.Module, names: tuple[str, ...], segments: Sequence[Segment]):
        super().__init__()
        self._attention = attention
        self._names = names
        self._segments = segments

    def __call__(self, x: mx.array, mask: Any = None, cache: Any = None) -> mx.array:
        attn = self._attention
        originals = {n: attn[n] for n in (*self._names, "o_proj")}
        segments = self._segments
        grouped = [
            k for k, s in enumerate(segments) if eligible(attn, s.stop - s.start, s.cache, x.dtype)
        ]
        rows = [segments[k].stop - segments[k].start for k in grouped]
        caches = [segments[k].cache for k in grouped]
        fused = fused_of(attn, self._names)
        if fused is not None and not fused.few_rows(x):
            fused = None  # bitwise the separate products only within the few-row kernel
        if fused is not None and len(grouped) == len(segments):
            # one q/k/v product, its rows read by the kernel as they are
            return originals["o_proj"](attend(attn, fused(x), None, None, rows, caches))
        projected = fused.split(fused(x)) if fused else [originals[n](x) for n in self._names]
        if len(grouped) == len(segments):  # every segment attends through the kernel
            return originals["o_proj"](attend(attn, *projected, rows, caches))
        outputs = self._family_attention(x, projected, originals)
        if grouped:
            index = mx.array(
                [r for k in grouped for r in range(segments[k].start, segments[k].stop)]
            )
            joint = attend(attn, *(p[0, index] for p in projected), rows, caches)
            starts = [0, *itertools.accumulate(rows)]
            for j, k in enumerate(grouped):
                outputs[k] = joint[:, starts[j] : starts[j + 1]]
        joined = outputs[0] if len(outputs) == 1 else mx.concatenate(outputs, axis=1)
        return originals["o_proj"](joined)

    def _family_attention(
        self, x: mx.array, projected: list[mx.array], originals: dict[str, nn.Module]
    ) -> list[mx.array | None]:
        """The family's own attention for each segment that does not decode one plain token."""
        attn = self._attention
        stand_ins = {n: _Rows(p) for n, p in zip(self._names, projected, strict=True)}
        outputs: list[mx.array | None] = []
        try:
            for name, stand_in in stand_ins.items():
                attn[name] = stand_in
            attn["o_proj"] = _Identity()
            for seg in self._segments:
                if eligible(attn, seg.stop - seg.start, seg.cache, x.dtype):
                    outputs.append(None)
                    continue
                for stand_in in stand_ins.values():
                    stand_in.span = (seg.start, seg.stop)
                outputs.append(attn(x[:, seg.start : seg.stop], seg.mask, seg.cache))
        finally:
            for name, module in originals.items():
                attn[name] = module
        return outputs


def row_groups(segments: Sequence[Segment], max_rows: int) -> list[list[Segment]]:
    """Consecutive segments in groups of at most ``max_rows`` rows (a longer segment alone)."""
    groups: list[list[Segment]] = [[]]
    for seg in segments:
        group = groups[-1]
        if group and seg.stop - group[0].start > max_rows:
            groups.append([])
        groups[-1].append(seg)
    return groups


def run_layer(
    layer: nn.Module, h: mx.array, segments: Sequence[Segment], max_rows: int = 0
) -> mx.array:
    """Apply ``layer`` to ``h`` (1, R, D) whose rows are split into ``segments`` (in row order).

    ``max_rows`` > 0 caps the rows of one product: more rows run as several passes of whole
    segments (beyond the few-row route's limit a product would lose batch invariance).
    """
    if max_rows and h.shape[1] > max_rows and len(segments) > 1:
        pieces = []
        for group in row_groups(segments, max_rows):
            start = group[0].start
            shifted = [Segment(s.start - start, s.stop - start, s.cache, s.mask) for s in group]
            pieces.append(run_layer(layer, h[:, start : group[-1].stop], shifted))
        return mx.concatenate(pieces, axis=1)
    attention = getattr(layer, "self_attn", None)
    if len(segments) == 1:
        seg = segments[0]
        if not eligible(attention, seg.stop - seg.start, seg.cache, h.dtype):
            return layer(h, seg.mask, seg.cache)
    names = _input_projections(attention)
    if names is None:
        pieces = [layer(h[:, s.start : s.stop], s.mask, s.cache) for s in segments]
        return mx.concatenate(pieces, axis=1)
    layer["self_attn"] = _RaggedAttention(attention, names, segments)
    try:
        return layer(h, None, None)
    finally:
        layer["self_attn"] = attention
