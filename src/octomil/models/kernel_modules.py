"""Attention and SwiGLU MLP modules that run on Octomil's kernels (``octomil.kernels.decode``).

MLX's Linux CPU backend computes ``exp`` one element at a time, so the softmax of prompt
attention (T x S scores per head and layer) and the SiLU of every MLP row cost more than the
matrix products around them once those are fast. These modules keep mlx-lm's code and weights
(the class of each instance is swapped, nothing is re-initialised) and differ in two steps:

- attention's causal softmax is one vectorised kernel (no mask array, no ``where``);
- the MLP's ``silu(gate) * up`` is one vectorised kernel.

With the kernels off (``OCTOMIL_NO_DECODE_KERNELS``, ``decode.disabled()``, or no compiler) and
wherever the call is not the plain causal case (an array mask, a sliding-window or quantized cache)
they run mlx-lm's own code. Numbers differ from mlx-lm's by float rounding (~1e-6 relative).
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import llama, qwen2
from mlx_lm.models.cache import KVCache

from octomil.kernels import decode
from octomil.quant.fused import GATE_UP, fused_of


def _kernel_attention(self: Any, x: mx.array, mask: Any = None, cache: Any = None) -> mx.array:
    """mlx-lm's Llama/Qwen2 attention with the kernels' causal softmax."""
    batch, rows, _ = x.shape
    queries, keys, values = self.q_proj(x), self.k_proj(x), self.v_proj(x)
    queries = queries.reshape(batch, rows, self.n_heads, -1).transpose(0, 2, 1, 3)
    keys = keys.reshape(batch, rows, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
    values = values.reshape(batch, rows, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
    offset = cache.offset if cache is not None else 0
    queries = self.rope(queries, offset=offset)
    keys = self.rope(keys, offset=offset)
    if cache is not None:
        keys, values = cache.update_and_fetch(keys, values)
    kv, seen, head_dim = self.n_kv_heads, keys.shape[2], queries.shape[-1]
    rep = self.n_heads // kv
    q = (queries * self.scale).reshape(batch, kv, rep * rows, head_dim)
    scores = (q @ keys.swapaxes(-1, -2)).reshape(batch, kv, rep, rows, seen)
    probs = decode.extension().causal_softmax(scores, seen - rows)  # type: ignore[union-attr]
    out = probs.reshape(batch, kv, rep * rows, seen) @ values  # (B, KV, rep*T, hd)
    out = out.reshape(batch, self.n_heads, rows, -1).transpose(0, 2, 1, 3)
    return self.o_proj(out.reshape(batch, rows, -1))


def _runs_on_kernels(x: mx.array, mask: Any, cache: Any) -> bool:
    rows = x.shape[1]
    causal = mask == "causal" if isinstance(mask, str) else (mask is None and rows == 1)
    plain_cache = cache is None or type(cache) is KVCache
    return causal and plain_cache and x.dtype == mx.float32 and decode.extension() is not None


class _KernelAttention:
    """Mixed in before a family's attention class: the kernels where the call allows them."""

    def __call__(self, x: mx.array, mask: Any = None, cache: Any = None) -> mx.array:
        if not _runs_on_kernels(x, mask, cache):
            return super().__call__(x, mask, cache)  # type: ignore[misc]
        return _kernel_attention(self, x, mask, cache)


class _KernelMLP:
    """Mixed in before a family's SwiGLU MLP class: the kernel's SwiGLU when it is on."""

    def __call__(self, x: mx.array) -> mx.array:
        ext = decode.extension()
        if ext is None or x.dtype != mx.float32:
            return super().__call__(x)  # type: ignore[misc]
        fused = fused_of(self, GATE_UP)  # type: ignore[arg-type]
        if fused is not None and fused.few_rows(x):  # one product; the kernel reads its rows
            return self.down_proj(ext.swiglu(fused(x)))  # type: ignore[attr-defined]
        return self.down_proj(ext.swiglu(self.gate_proj(x), self.up_proj(x)))  # type: ignore[attr-defined]


class KernelLlamaAttention(_KernelAttention, llama.Attention):
    pass


class KernelQwen2Attention(_KernelAttention, qwen2.Attention):
    pass


class KernelLlamaMLP(_KernelMLP, llama.MLP):
    pass


class KernelQwen2MLP(_KernelMLP, qwen2.MLP):
    pass


_REPLACEMENTS = {
    llama.Attention: KernelLlamaAttention,
    qwen2.Attention: KernelQwen2Attention,
    llama.MLP: KernelLlamaMLP,
    qwen2.MLP: KernelQwen2MLP,
}
PLAIN_ATTENTION = (KernelLlamaAttention, KernelQwen2Attention)


def install_kernel_modules(model: nn.Module) -> int:
    """Swap the class of every plain attention and SwiGLU MLP module; returns how many."""
    swapped = 0
    for _, module in model.named_modules():
        replacement = _REPLACEMENTS.get(type(module))
        if replacement is not None:
            module.__class__ = replacement
            swapped += 1
    return swapped
