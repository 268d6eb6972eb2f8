"""Choose the weight layout (precision / quantization) that decodes fastest on this device.

On MLX's Linux CPU backend quantized and half-precision matmuls do not use BLAS and run several
times slower than fp32 with OpenBLAS (see BRIEF), so a 4-bit checkpoint is often fastest
dequantized to fp32. We do not assume that: :func:`measure_layouts` times one decode-shaped
product (one token through an MLP-sized projection) in each candidate layout at load time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
LAYOUT_CHOICES = ("auto", "native", *DTYPES)


@dataclass(frozen=True)
class LayoutChoice:
    layout: str  # "native" or a dtype name
    timings_ms: dict[str, float]  # per candidate, one decode-shaped matvec
    measured: bool

    def describe(self, native: str) -> str:
        what = native if self.layout == "native" else self.layout
        if not self.measured:
            return f"{what} (requested)"
        times = ", ".join(f"{k} {v:.2f} ms" for k, v in sorted(self.timings_ms.items(), key=lambda kv: kv[1]))
        return f"{what} (measured per-token matvec: {times})"


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules())


def native_description(model: nn.Module) -> str:
    for _, m in model.named_modules():
        if isinstance(m, nn.QuantizedLinear):
            return f"{m.bits}-bit quantized"
    for _, m in model.named_modules():
        if isinstance(m, nn.Linear):
            return str(m.weight.dtype).replace("mlx.core.", "")
    return "native"


def _time(fn, repeats: int = 15) -> float:
    mx.eval(fn())  # warm-up
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(repeats):
            mx.eval(fn())
        best = min(best, (time.perf_counter() - t) / repeats)
    return best * 1000


def _in_features(m: nn.Module) -> int:
    packed = m.weight.shape[1]
    return packed * 32 // m.bits if isinstance(m, nn.QuantizedLinear) else packed


def _largest_projection(layer: nn.Module) -> nn.Module | None:
    """The largest projection of a decoder layer, to time in every layout."""
    linears = [m for _, m in layer.named_modules() if isinstance(m, (nn.Linear, nn.QuantizedLinear))]
    return max(linears, key=lambda m: m.weight.shape[0] * _in_features(m), default=None)


def measure_layouts(model: nn.Module) -> dict[str, float]:
    """Milliseconds of one token through a representative projection, per candidate layout."""
    proj = _largest_projection(model.model.layers[0])
    if proj is None:
        return {}
    if isinstance(proj, nn.QuantizedLinear):
        w = mx.dequantize(proj.weight, proj.scales, proj.biases, proj.group_size, proj.bits)
    else:
        w = proj.weight
    x = mx.random.normal((1, 1, w.shape[1]))
    timings: dict[str, float] = {}
    if isinstance(proj, nn.QuantizedLinear):
        timings["native"] = _time(lambda: proj(x.astype(proj.scales.dtype)))
    for name, dtype in DTYPES.items():
        wd = w.astype(dtype)
        xd = x.astype(dtype)
        mx.eval(wd, xd)
        timings[name] = _time(lambda wd=wd, xd=xd: xd @ wd.T)
    return timings


def choose_layout(model: nn.Module, requested: str = "auto") -> LayoutChoice:
    if requested not in LAYOUT_CHOICES:
        raise ValueError(f"--dtype must be one of {', '.join(LAYOUT_CHOICES)}, got {requested!r}")
    if requested != "auto":
        return LayoutChoice(requested, {}, measured=False)
    timings = measure_layouts(model)
    if not timings:
        return LayoutChoice("native", {}, measured=False)
    best = min(timings, key=timings.__getitem__)
    if best != "native" and not is_quantized(model):
        # Within 10% of the checkpoint's own dtype is noise; keep it rather than convert.
        current = native_description(model)
        if current in timings and timings[current] <= 1.1 * timings[best]:
            best = "native"
    return LayoutChoice(best, timings, measured=True)


def apply_layout(model: nn.Module, layout: str) -> None:
    """Convert ``model`` in place to ``layout`` ("native" leaves it untouched)."""
    if layout == "native":
        return
    from mlx_lm.utils import dequantize_model

    if is_quantized(model):
        dequantize_model(model)
    model.set_dtype(DTYPES[layout])
    mx.eval(model.parameters())
