"""``--dtype q8|q4``: a model's projections and head as 8- or 4-bit weights on Octomil's kernel.

:func:`compact_model` replaces, in place, every linear layer with a :class:`CompactLinear` and the
tied embedding (or an untied ``lm_head``) with a :class:`CompactEmbedding`; both are subclasses of
mlx's own quantized modules with the same parameters (MLX affine: uint32 codes, a scale and a bias
per group of 32 inputs), so saving, ``head_matrix`` and mlx-lm's forward pass keep working. Only
the product changes: ``octomil.quant.kernel`` instead of MLX's scalar CPU ``quantized_matmul``.

Weights already quantized at the target bits (the embedded GGUF's Q4_1 tensors under ``q4``) are
kept as they are, fp16 scales and biases included (Q4_1's own bytes, bit for bit): served at their
own precision. 4-bit weights under ``q8`` become level 16 q at step s / 16 in the same groups
(a power of two: exact in fp16 too, so every 4-bit weight is kept bit for bit; fp32 scales where
fp16 would round). Float weights are quantized with MLX's ``mx.quantize`` (fp32 scales). The head
stays at 8 bits (or its checkpoint's own 4/8 bits): it decides every token and is a fifth of the
weights. Activations are fp32 in and out; the few-row kernel rounds them to int8 inside on AVX2
(``octomil.quant.kernel``). Each attention's q/k/v and each MLP's gate/up also get one fused
product for decode steps (``octomil.quant.fused``).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from octomil.quant import kernel

GROUP_SIZE = 32
HEAD_BITS = 8
FORMATS = {"q8": 8, "q4": 4}


class CompactLinear(nn.QuantizedLinear):
    """``nn.QuantizedLinear`` whose product runs Octomil's CPU kernel (fp32 in and out)."""

    def __init__(
        self,
        weight: mx.array,
        scales: mx.array,
        biases: mx.array,
        group_size: int,
        bits: int,
        bias: mx.array | None = None,
    ) -> None:
        nn.Module.__init__(self)
        self.group_size, self.bits, self.mode = group_size, bits, "affine"
        self.weight, self.scales, self.biases = weight, scales, biases
        if bias is not None:
            self.bias = bias
        self.freeze()

    def __call__(self, x: mx.array) -> mx.array:
        y = kernel.quantized_matmul(
            x, self["weight"], self["scales"], self["biases"], self.group_size, self.bits
        )
        return y + self["bias"] if "bias" in self else y


class CompactEmbedding(nn.QuantizedEmbedding):
    """``nn.QuantizedEmbedding`` (lookup as in mlx) whose ``as_linear`` (the tied head) runs
    Octomil's kernel."""

    def __init__(
        self, weight: mx.array, scales: mx.array, biases: mx.array, group_size: int, bits: int
    ) -> None:
        nn.Module.__init__(self)
        self.group_size, self.bits, self.mode = group_size, bits, "affine"
        self.weight, self.scales, self.biases = weight, scales, biases
        self.num_embeddings = int(weight.shape[0])
        self.dims = int(weight.shape[1]) * 32 // bits
        self.freeze()

    def as_linear(self, x: mx.array) -> mx.array:
        return kernel.quantized_matmul(
            x, self["weight"], self["scales"], self["biases"], self.group_size, self.bits
        )


Triple = tuple[mx.array, mx.array, mx.array, int]  # codes, scales, biases, group size


def _triple(module: nn.Module, bits: int) -> Triple:
    """``module``'s weights as an MLX affine ``bits`` triple with fp16 (as stored) or fp32 scales
    and biases."""
    quantized = isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding))
    if quantized and module.mode == "affine" and module.group_size % 32 == 0:
        dtype = mx.float16 if module["scales"].dtype == mx.float16 else mx.float32
        scales, biases = module["scales"].astype(dtype), module["biases"].astype(dtype)
        if module.bits == bits:
            return module["weight"], scales, biases, module.group_size
        if module.bits == 4 and bits == 8:  # exact: level q at step s is level 16 q at step s / 16
            step = scales / 16
            if not mx.array_equal(step * 16, scales).item():  # fp16 underflow: keep it exact
                step, biases = scales.astype(mx.float32) / 16, biases.astype(mx.float32)
            return _repack(_unpack(module["weight"], 4) * 16, 8), step, biases, module.group_size
    if quantized:
        dense = mx.dequantize(
            module["weight"],
            module["scales"],
            module.get("biases"),
            group_size=module.group_size,
            bits=module.bits,
            mode=module.mode,
        ).astype(mx.float32)
        group = module.group_size if module.group_size % GROUP_SIZE == 0 else GROUP_SIZE
    else:
        dense, group = module["weight"].astype(mx.float32), GROUP_SIZE
    codes, scales, biases = mx.quantize(dense, group_size=group, bits=bits)
    return codes, scales, biases, group


def _unpack(codes: mx.array, bits: int) -> mx.array:
    """MLX's packing undone: (n, k * bits / 32) uint32 -> (n, k) levels, low bits first."""
    per = 32 // bits
    shifts = mx.arange(per, dtype=mx.uint32) * bits
    levels = (codes[..., None] >> shifts) & ((1 << bits) - 1)
    return levels.reshape(codes.shape[0], -1)


def _repack(levels: mx.array, bits: int) -> mx.array:
    per = 32 // bits
    shifts = mx.arange(per, dtype=mx.uint32) * bits
    grouped = levels.astype(mx.uint32).reshape(levels.shape[0], -1, per) << shifts
    return grouped.sum(axis=-1).astype(mx.uint32)  # disjoint bit fields: the sum is an OR


def _head_bits(module: nn.Module) -> int:
    if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)) and module.bits in (4, 8):
        return module.bits
    return HEAD_BITS


def compact_model(model: nn.Module, fmt: str, *, stock: bool = False) -> dict[str, int]:
    """Convert ``model`` in place to ``fmt`` ("q8" or "q4"); returns how many modules per bits.

    ``stock`` builds the same weights in mlx's own quantized modules (MLX's product: the reference
    for parity tests and benchmarks) instead of Octomil's.
    """
    bits = FORMATS[fmt]
    replacements: list[tuple[str, nn.Module]] = []
    counts: dict[str, int] = {}
    for name, module in model.named_modules():
        is_head = name.endswith("lm_head") or (
            name.endswith("embed_tokens") and not hasattr(model, "lm_head")
        )
        if isinstance(module, (nn.Embedding, nn.QuantizedEmbedding)) and not is_head:
            continue  # an untied input embedding: a lookup, not a product
        if not isinstance(
            module, (nn.Linear, nn.QuantizedLinear, nn.Embedding, nn.QuantizedEmbedding)
        ):
            continue
        want = _head_bits(module) if is_head else bits
        codes, scales, biases, group = _triple(module, want)
        if stock:  # mlx's own product takes fp32 activations with fp32 scales
            scales, biases = scales.astype(mx.float32), biases.astype(mx.float32)
        if isinstance(module, (nn.Embedding, nn.QuantizedEmbedding)):
            new: nn.Module = CompactEmbedding(codes, scales, biases, group, want)
        else:
            new = CompactLinear(codes, scales, biases, group, want, module.get("bias"))
        if stock:  # the same parameters in mlx's own class: its product, its lookup
            new.__class__ = new.__class__.__bases__[0]
        replacements.append((name, new))
        counts[f"{want}-bit"] = counts.get(f"{want}-bit", 0) + 1
    # Norms and any other float parameters; before the swap, so fp16 scales stay fp16.
    model.set_dtype(mx.float32)
    if replacements:
        from mlx.utils import tree_unflatten

        model.update_modules(tree_unflatten(replacements))
    for _, module in model.named_modules():
        if isinstance(module, (CompactLinear, CompactEmbedding)):
            for key in ("weight", "scales", "biases"):
                module[key] = mx.contiguous(module[key])  # the kernel reads rows directly
    mx.eval(model.parameters())
    if not stock:
        from octomil.quant.fused import fuse_projections

        counts["fused"] = fuse_projections(model)
    return counts
