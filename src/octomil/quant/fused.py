"""Fused projections for compact weights: q/k/v as one product, gate/up as one product.

A decode step of the embedded model makes seven products per layer; each costs MLX a graph node
and the kernel a hand-off to its second thread, ~10 us on top of its work (a 192 x 576 4-bit k or
v product takes ~15 us for ~5 us of arithmetic). Reading q, k and v's weights in one product of
576 + 192 + 192 outputs, and gate and up's in one of 2 x 1536, makes it four. vLLM's
``QKVParallelLinear`` and merged gate/up layers do the same.

:func:`fuse_projections` concatenates the weights once at load and points the separate modules'
weights at views of them, so memory is shared and the model's parameters still count every byte
once; mlx-lm's own forward pass (prefill) keeps calling the separate modules. The few-row kernel
computes every output independently of the others, so a fused product's columns carry the bits
the separate products would.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from octomil.quant import kernel
from octomil.quant.modules import CompactLinear

QKV = ("q_proj", "k_proj", "v_proj")
GATE_UP = ("gate_proj", "up_proj")


class FusedProjection:
    """Several ``CompactLinear`` modules' weights as one product; not a module (its arrays are not
    parameters: the separate modules' views of them are)."""

    def __init__(self, parts: list[CompactLinear]) -> None:
        first = parts[0]
        self.group_size, self.bits = first.group_size, first.bits
        self._max_rows = kernel.max_rows()  # asked per layer of every decode step
        self.sizes = [int(p["weight"].shape[0]) for p in parts]
        self.weight, self.scales, self.biases = (
            mx.concatenate([p[key] for p in parts]) for key in ("weight", "scales", "biases")
        )
        has_bias = ["bias" in p for p in parts]
        self.bias = mx.concatenate([p["bias"] for p in parts]) if all(has_bias) else None
        mx.eval(
            self.weight, self.scales, self.biases, *([self.bias] if self.bias is not None else [])
        )
        start = 0
        for part, size in zip(parts, self.sizes, strict=True):
            rows = slice(start, start + size)
            for key in ("weight", "scales", "biases"):
                part[key] = getattr(self, key)[rows]
            if self.bias is not None:
                part["bias"] = self.bias[start : start + size]
            start += size
        mx.eval([p.parameters() for p in parts])

    def __call__(self, x: mx.array) -> mx.array:
        y = kernel.quantized_matmul(
            x, self.weight, self.scales, self.biases, self.group_size, self.bits
        )
        return y + self.bias if self.bias is not None else y

    def few_rows(self, x: mx.array) -> bool:
        """Whether ``x``'s product takes the few-row kernel, where a fused product's columns
        are bitwise the separate products' (prefill's sgemm blocks differ in rounding)."""
        return x.size <= self._max_rows * x.shape[-1]

    def split(self, y: mx.array) -> list[mx.array]:
        """The parts' outputs of a fused output (views along the last axis)."""
        out, start = [], 0
        for size in self.sizes:
            out.append(y[..., start : start + size])
            start += size
        return out


def _fusable(parts: list[nn.Module]) -> bool:
    if not all(type(p) is CompactLinear for p in parts):
        return False
    first = parts[0]
    same = all(
        p.bits == first.bits
        and p.group_size == first.group_size
        and p["weight"].shape[1] == first["weight"].shape[1]
        and p["scales"].dtype == first["scales"].dtype
        for p in parts
    )
    biases = {"bias" in p for p in parts}
    return same and len(biases) == 1


def fuse_projections(model: nn.Module) -> int:
    """Give every attention (q/k/v) and SwiGLU MLP (gate/up) of compact weights a fused product
    (``module.fused``); returns how many were fused."""
    fused = 0
    for _, module in model.named_modules():
        for names in (QKV, GATE_UP):
            if not all(n in module for n in names):
                continue
            parts = [module[n] for n in names]
            if _fusable(parts):
                # object.__setattr__: a plain attribute, not a child module or parameter
                object.__setattr__(module, "fused", FusedProjection(parts))
                fused += 1
    return fused


def fused_of(module: nn.Module, names: tuple[str, ...]) -> FusedProjection | None:
    """``module``'s fused product of ``names`` (QKV or GATE_UP), if it has one."""
    fused = module.__dict__.get("fused")
    if fused is None or len(fused.sizes) != len(names):
        return None
    return fused
