"""Decode-friendly weight storage: linear weights kept as contiguous (in, out) matrices.

mlx stores ``nn.Linear`` weights as (out, in) and computes ``x @ W.T``; with one token per step
that is a matrix-vector product which, on MLX's CPU backend with OpenBLAS, runs markedly faster
when the weight is stored transposed and contiguous (the BLAS call becomes a plain no-transpose
product). The math is the same product; the loader times both storages and keeps this one only
when it is faster.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


class TransposedLinear(nn.Module):
    """``nn.Linear`` with its weight stored as (in, out)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.weight_t = mx.contiguous(linear.weight.T)
        if "bias" in linear:
            self.bias = linear.bias

    def __call__(self, x: mx.array) -> mx.array:
        y = x @ self.weight_t
        return y + self.bias if "bias" in self else y


class TransposedEmbedding(nn.Module):
    """A tied embedding stored (dims, vocab): column lookup for inputs, plain product as head."""

    def __init__(self, embedding: nn.Embedding) -> None:
        super().__init__()
        self.weight_t = mx.contiguous(embedding.weight.T)

    def __call__(self, ids: mx.array) -> mx.array:
        return mx.take(self.weight_t, ids, axis=1).moveaxis(0, -1)

    def as_linear(self, x: mx.array) -> mx.array:
        return x @ self.weight_t


def transpose_for_decode(model: nn.Module) -> None:
    """Replace float ``nn.Linear`` / tied ``nn.Embedding`` modules of ``model`` in place."""
    replacements = []
    for name, module in model.named_modules():
        if type(module) is nn.Linear:
            replacements.append((name, TransposedLinear(module)))
        elif (
            type(module) is nn.Embedding
            and name.endswith("embed_tokens")
            and not hasattr(model, "lm_head")
        ):
            replacements.append((name, TransposedEmbedding(module)))
    if replacements:
        from mlx.utils import tree_unflatten

        model.update_modules(tree_unflatten(replacements))
    mx.eval(model.parameters())
