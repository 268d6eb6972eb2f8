"""Choose the weight layout (precision / quantization) that decodes fastest on this device.

On MLX's Linux CPU backend quantized and half-precision matmuls do not use BLAS and run several
times slower than fp32 with OpenBLAS (see BRIEF), so a 4-bit checkpoint is often fastest
dequantized to fp32. We do not assume that: :func:`measure_layouts` times one decode-shaped
product (one token through an MLP-sized projection) in each candidate layout at load time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import mlx.core as mx
import mlx.nn as nn

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
LAYOUT_CHOICES = ("auto", "native", *DTYPES)
# A layout that rounds the weights must be this much faster than the best exact one to be chosen:
# timings under load are noisy, and precision should not be traded for noise.
LOSSY_MARGIN = 1.25
# Timing stops for a layout this many times slower than the fastest after a round.
DROPOUT_FACTOR = 3.0
# (in, out) storage is adopted when its matvec takes less than this share of the (out, in) one.
STORAGE_MARGIN = 0.95


@dataclass(frozen=True)
class LayoutChoice:
    layout: str  # "native" or a dtype name
    timings_ms: dict[str, float]  # per candidate, one decode-shaped matvec
    measured: bool
    transposed: bool = False  # float weights stored (in, out); see octomil.models.transposed
    storage_ms: tuple[float, float] | None = None  # matvec ms with (out, in) vs (in, out) storage

    def describe(self, native: str) -> str:
        what = native if self.layout == "native" else self.layout
        if self.transposed:
            what += " (in, out)"
        if not self.measured:
            return f"{what} (requested)"
        times = ", ".join(
            f"{k} {v:.2f} ms" for k, v in sorted(self.timings_ms.items(), key=lambda kv: kv[1])
        )
        text = f"{what} (measured per-token matvec: {times}"
        if self.storage_ms:
            out_in, in_out = self.storage_ms
            text += f"; storage (out, in) {out_in:.2f} ms vs (in, out) {in_out:.2f} ms"
        return text + ")"


def is_quantized(model: nn.Module) -> bool:
    return any(
        isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules()
    )


def native_description(model: nn.Module) -> str:
    for _, m in model.named_modules():
        if isinstance(m, nn.QuantizedLinear):
            return f"{m.bits}-bit quantized"
    for _, m in model.named_modules():
        if isinstance(m, nn.Linear):
            return str(m.weight.dtype).replace("mlx.core.", "")
    return "native"


def _time_interleaved(
    fns: dict[str, Callable[[], mx.array]], rounds: int = 7, repeats: int = 10
) -> dict[str, float]:
    """Best-of-rounds milliseconds per call; candidates alternate so load spikes hit all alike."""
    for fn in fns.values():
        mx.eval(fn())  # warm-up
    best = {name: float("inf") for name in fns}
    racing = dict(fns)
    for _ in range(rounds):
        for name, fn in racing.items():
            t = time.perf_counter()
            for _ in range(repeats):
                mx.eval(fn())
            best[name] = min(best[name], (time.perf_counter() - t) / repeats * 1000)
        # A candidate several times slower than the leader cannot win: stop re-timing it.
        leader = min(best[n] for n in racing)
        racing = {n: f for n, f in racing.items() if best[n] <= DROPOUT_FACTOR * leader}
    return best


def _in_features(m: nn.Module) -> int:
    packed = m.weight.shape[1]
    return packed * 32 // m.bits if isinstance(m, nn.QuantizedLinear) else packed


def _largest_projection(layer: nn.Module) -> nn.Module | None:
    """The largest projection of a decoder layer, to time in every layout."""
    linears = [
        m for _, m in layer.named_modules() if isinstance(m, (nn.Linear, nn.QuantizedLinear))
    ]
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
    fns: dict[str, Callable[[], mx.array]] = {}
    if isinstance(proj, nn.QuantizedLinear):
        xq = x.astype(proj.scales.dtype)
        fns["native"] = lambda: proj(xq)
    for name, dtype in DTYPES.items():
        wd, xd = w.astype(dtype), x.astype(dtype)
        mx.eval(wd, xd)
        fns[name] = lambda wd=wd, xd=xd: xd @ wd.T
    return _time_interleaved(fns)


def measure_storage(model: nn.Module) -> tuple[float, float] | None:
    """Milliseconds of one token through the largest float projection: (out, in) vs (in, out)."""
    proj = _largest_projection(model.model.layers[0])
    if not isinstance(proj, nn.Linear):
        return None
    w = proj.weight
    wt = mx.contiguous(w.T)
    x = mx.random.normal((1, 1, w.shape[1])).astype(w.dtype)
    mx.eval(wt, x)
    t = _time_interleaved({"out_in": lambda: x @ w.T, "in_out": lambda: x @ wt})
    return t["out_in"], t["in_out"]


def choose_layout(model: nn.Module, requested: str = "auto") -> LayoutChoice:
    """Pick (and measure) the layout; converting happens in :func:`apply_layout`."""
    if requested not in LAYOUT_CHOICES:
        raise ValueError(f"--dtype must be one of {', '.join(LAYOUT_CHOICES)}, got {requested!r}")
    if requested != "auto":
        return LayoutChoice(requested, {}, measured=False)
    timings = measure_layouts(model)
    if not timings:
        return LayoutChoice("native", {}, measured=False)
    native = native_description(model)
    # fp32 holds quantized, fp16 and bf16 weights exactly; the other dtypes round them.
    lossless = {k: v for k, v in timings.items() if k in ("native", "float32", native)}
    best = min(lossless, key=lossless.__getitem__)
    fastest = min(timings, key=timings.__getitem__)
    if timings[fastest] * LOSSY_MARGIN < timings[best]:
        best = fastest
    if best == native:
        best = "native"
    return LayoutChoice(best, timings, measured=True)


def convert_precision(model: nn.Module, layout: str) -> None:
    """Dequantize (if quantized) and cast ``model`` in place to ``layout``; "native" is a no-op."""
    if layout == "native":
        return
    from mlx_lm.utils import dequantize_model

    if is_quantized(model):
        dequantize_model(model)
    model.set_dtype(DTYPES[layout])
    mx.eval(model.parameters())


def apply_layout(model: nn.Module, choice: LayoutChoice) -> LayoutChoice:
    """Convert ``model`` in place; then store float weights (in, out) if measured faster.

    Returns the choice with the storage decision filled in.
    """
    convert_precision(model, choice.layout)
    storage = measure_storage(model)
    if storage is None or storage[1] >= STORAGE_MARGIN * storage[0]:
        return replace(choice, storage_ms=storage)
    from octomil.models.transposed import transpose_for_decode

    transpose_for_decode(model)
    return replace(choice, transposed=True, storage_ms=storage)
