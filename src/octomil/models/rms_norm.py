"""RMS norm as one operation (CPU decode speed), the numbers of ``mx.fast.rms_norm`` up to rounding.

``mx.fast.rms_norm`` has no CPU kernel: its fallback runs square, mean, add, rsqrt and two
multiplies as separate operations, ~50 us per norm inside a decode step, 61 norms per token on
the embedded model. Compiled, the same float32 operations fuse into one kernel: a decode step
measured 35.5 -> 33.1 ms (interleaved A/B) with bit-identical outputs. Only exact ``nn.RMSNorm``
modules are replaced (gemma's 1 + weight variant keeps its own), and only float32 decode-sized
inputs take the compiled path: half-precision inputs keep the fallback, which accumulates in
float32, and prefill chunks keep it so that each new prompt length adds no compilation.

With the decode kernels (``octomil.kernels.decode``) a decode step's norms (up to 32 rows: a
batch, a verification) are one kernel operation instead of the compiled one, which still costs
MLX three nodes (square, sum, the fused rest): ~180 of a token's nodes on the embedded model, at a
few microseconds of scheduling each. The kernel sums the squares in another order (~1e-7
relative), one row at a time, so a row's result does not depend on its batch.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from octomil.kernels import decode
from octomil.models.rope_table import COMPILED_MAX_ROWS

KERNEL_MAX_ROWS = 32  # a decode step's rows: engine.decode_modules.MAX_SEGMENT_ROWS, a batch


@mx.compile
def _rms_norm(x: mx.array, weight: mx.array, eps: mx.array) -> mx.array:
    return (x * mx.rsqrt(mx.mean(mx.square(x), axis=-1, keepdims=True) + eps)) * weight


class CompiledRMSNorm(nn.Module):
    """Drop-in for ``nn.RMSNorm`` sharing its weight (same parameter name, ``weight``)."""

    def __init__(self, original: nn.RMSNorm):
        super().__init__()
        self.weight = original.weight
        self.eps = original.eps
        self._eps = mx.array(original.eps, dtype=mx.float32)

    def __call__(self, x: mx.array) -> mx.array:
        float32 = x.dtype == mx.float32 and self.weight.dtype == mx.float32
        kernels = decode.extension()
        if float32 and kernels is not None and x.size <= KERNEL_MAX_ROWS * x.shape[-1]:
            return kernels.rms_norm(x, self.weight, self.eps)
        if not float32 or x.size > COMPILED_MAX_ROWS * x.shape[-1]:
            return mx.fast.rms_norm(x, self.weight, self.eps)  # prefill: no per-length compile
        return _rms_norm(x, self.weight, self._eps)


def install_compiled_rms_norm(model: nn.Module) -> int:
    """Replace every ``nn.RMSNorm`` child in ``model`` with a :class:`CompiledRMSNorm`."""
    replaced = 0
    for _, module in model.named_modules():
        for name, child in list(module.items()):
            if type(child) is nn.RMSNorm:
                module[name] = CompiledRMSNorm(child)
                replaced += 1
    return replaced
