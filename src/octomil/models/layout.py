"""Choose the weight layout (precision / quantization) that decodes fastest on this device.

On MLX's Linux CPU backend quantized and half-precision matmuls do not use BLAS and run several
times slower than fp32 with OpenBLAS (see BRIEF), so a 4-bit checkpoint is often fastest
dequantized to fp32. We do not assume that: :func:`measure_layouts` times one decode-shaped
product (one token through an MLP-sized projection) at load time. ``--dtype auto`` chooses only
among *exact* layouts (the checkpoint's own, or fp32, which holds every 4/8-bit, fp16 and bf16
weight exactly): a rounding layout (bf16, fp16 from fp32) changes answers, so it is used only when
asked for with ``--dtype``. A 4- or 8-bit checkpoint's own precision is served by Octomil's kernel
(``q4``/``q8``, :mod:`octomil.quant`) when it is available; that candidate and fp32 are timed on
one token through every layer's largest projection, so the fp32 weights stream from memory as in
decode rather than sitting in cache. Exact layouts still sum in different orders, so the first
decision on a machine is kept (:mod:`octomil.models.layout_cache`): machine load never changes a
later one.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import mlx.core as mx
import mlx.nn as nn

from octomil.config import WEIGHT_LAYOUTS
from octomil.models import layout_cache

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
COMPACT = {"q8": 8, "q4": 4}  # octomil.quant's formats: bits of the layers' weights
LAYOUT_CHOICES = WEIGHT_LAYOUTS
assert set(LAYOUT_CHOICES) == {"auto", "native", *DTYPES, *COMPACT}
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
    cached: bool = False  # decided by an earlier load's measurement on this machine
    fallback: str = ""  # why a requested q8/q4 layout is served as float32 instead

    def describe(self, native: str) -> str:
        what = native if self.layout == "native" else self.layout
        if self.transposed:
            what += " (in, out)"
        if self.fallback:
            what += f" ({self.fallback})"
        if self.layout in COMPACT:
            from octomil.quant import kernel

            what += f" on {kernel.describe()}"
        if not self.measured:
            return f"{what} (requested)"
        times = ", ".join(
            f"{native if k == 'native' else k} {v:.2f} ms"
            for k, v in sorted(self.timings_ms.items(), key=lambda kv: kv[1])
        )
        text = f"{what} (" + (
            f"measured per-token matvec: {times}" if times else "no other exact layout"
        )
        if self.storage_ms:
            out_in, in_out = self.storage_ms
            text += f"; storage (out, in) {out_in:.2f} ms vs (in, out) {in_out:.2f} ms"
        if self.cached:
            text += f"; decided earlier on this machine, kept in {layout_cache.decisions_path()}"
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


def _decision_key(proj: nn.Module, **extra: object) -> dict[str, object]:
    """What a timing decision depends on: the machine, its libraries, the weights' format."""
    from octomil import blas

    weights = f"{proj.bits}-bit" if isinstance(proj, nn.QuantizedLinear) else str(proj.weight.dtype)
    weights = weights.replace("mlx.core.", "")
    return {
        "cpu": layout_cache.cpu_name(),
        "machine": platform.machine(),
        "device": str(mx.default_device()),
        "mlx": mx.__version__,
        "blas": blas.describe(),
        "weights": weights,
        "projection": [int(proj.weight.shape[0]), _in_features(proj)],
        **extra,
    }


def _compact_native(model: nn.Module) -> str | None:
    """ "q4"/"q8" when the checkpoint is 4/8-bit affine and Octomil's kernel can serve it as is."""
    proj = _largest_projection(model.model.layers[0])
    if not isinstance(proj, nn.QuantizedLinear) or proj.mode != "affine" or proj.group_size % 32:
        return None
    fmt = {8: "q8", 4: "q4"}.get(proj.bits)
    from octomil.quant import kernel

    return fmt if fmt and kernel.available() else None


# A compact layout must not slow batched decoding down: it is timed at one row and at a batch
# of this many rows (a typical decode batch) and chosen only if it wins at both.
BATCH_ROWS = 8


def measure_compact(model: nn.Module, fmt: str) -> dict[str, float]:
    """Milliseconds of one token, and of a batch of ``BATCH_ROWS`` rows, through every layer's
    largest projection: ``fmt`` on Octomil's kernel vs fp32 (the weights of all layers exceed the
    caches, as in decode). Keys: ``fmt``, ``float32`` and the same with `` x8``."""
    from octomil.quant import kernel

    projs = [_largest_projection(layer) for layer in model.model.layers]
    # The scales as served: fp16 as stored (a GGUF's), else fp32 (see quant.modules).
    keep = mx.float16 if projs[0].scales.dtype == mx.float16 else mx.float32
    triples = [(p.weight, p.scales.astype(keep), p.biases.astype(keep)) for p in projs]
    f32 = mx.float32
    dense = [
        mx.dequantize(w, s.astype(f32), b.astype(f32), projs[0].group_size, projs[0].bits)
        for w, s, b in triples
    ]
    mx.eval(triples, dense)
    size, bits = projs[0].group_size, projs[0].bits
    fns = {}
    for rows, suffix in ((1, ""), (BATCH_ROWS, f" x{BATCH_ROWS}")):
        x = mx.random.normal((1, rows, dense[0].shape[1]))
        fns[fmt + suffix] = lambda x=x: mx.stack(
            [kernel.quantized_matmul(x, *t, size, bits) for t in triples]
        )
        fns["float32" + suffix] = lambda x=x: mx.stack([x @ w.T for w in dense])
    return _time_interleaved(fns, rounds=5, repeats=3)


def _fastest(timings: dict[str, float]) -> str:
    """The layout to serve: the fastest one-row candidate, except that a compact one must also be
    faster than fp32 on a batch (its `` xN`` timings)."""
    single = {k: v for k, v in timings.items() if " x" not in k}
    best = min(single, key=single.__getitem__)
    batched = [k for k in timings if k.startswith(best + " x")]
    if batched and "float32" in single:
        rows = batched[0].split(" ", 1)[1]
        if timings[batched[0]] >= timings[f"float32 {rows}"]:
            return "float32"
    return best


def measure_layouts(model: nn.Module, compact: str | None = None) -> dict[str, float]:
    """Milliseconds of one token through a representative projection, per candidate layout:
    "native" (the checkpoint's own) and "float32", or ``compact`` (q8/q4 on Octomil's kernel)
    and "float32"; empty when there is nothing to choose."""
    proj = _largest_projection(model.model.layers[0])
    if proj is None:
        return {}
    fmt = compact
    if fmt:
        return measure_compact(model, fmt)
    if isinstance(proj, nn.QuantizedLinear):
        w = mx.dequantize(proj.weight, proj.scales, proj.biases, proj.group_size, proj.bits)
        xq = mx.random.normal((1, 1, w.shape[1])).astype(proj.scales.dtype)
        native = lambda: proj(xq)  # noqa: E731
    elif proj.weight.dtype != mx.float32:
        w = proj.weight
        xn = mx.random.normal((1, 1, w.shape[1])).astype(w.dtype)
        native = lambda: xn @ w.T  # noqa: E731
    else:
        return {}  # fp32 already: the only exact layout
    w32 = w.astype(mx.float32)
    x32 = mx.random.normal((1, 1, w.shape[1]))
    mx.eval(w32, x32)
    return _time_interleaved({"native": native, "float32": lambda: x32 @ w32.T})


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


def choose_layout(
    model: nn.Module, requested: str = "auto", compact_ok: Callable[[str], bool] | None = None
) -> LayoutChoice:
    """Pick the layout; converting happens in :func:`apply_layout`.

    ``auto`` picks the faster exact layout, native or fp32, never one that rounds the weights;
    a 4/8-bit checkpoint's own format on Octomil's kernel (q4/q8) is a candidate only where
    ``compact_ok(format)`` says so (the caller's calibration covers that format; None: always).
    The decision is measured once per machine and kept (see the module docstring)."""
    if requested not in LAYOUT_CHOICES:
        raise ValueError(f"--dtype must be one of {', '.join(LAYOUT_CHOICES)}, got {requested!r}")
    if requested != "auto":
        return LayoutChoice(requested, {}, measured=False)
    proj = _largest_projection(model.model.layers[0])
    if proj is None:
        return LayoutChoice("native", {}, measured=False)
    compact = _compact_native(model)
    label = compact or "unavailable"
    if compact and compact_ok is not None and not compact_ok(compact):
        compact, label = None, "not calibrated"

    def measure() -> dict[str, object]:
        timings = measure_layouts(model, compact)
        best = _fastest(timings) if timings else "native"
        return {"layout": best, "timings_ms": timings}

    key = _decision_key(proj, compact=label, batch_rows=BATCH_ROWS)
    decision, cached = layout_cache.decide("layout", key, measure)
    timings = {str(k): float(v) for k, v in dict(decision.get("timings_ms", {})).items()}
    layout = str(decision.get("layout"))
    if layout not in ("native", "float32", compact):  # hand-edited/foreign: never a rounding one
        layout = "native"
    return LayoutChoice(layout, timings, measured=True, cached=cached and bool(timings))


def convert_precision(model: nn.Module, layout: str, *, stock: bool = False) -> None:
    """Dequantize (if quantized) and cast ``model`` in place to ``layout``; "native" is a no-op.
    ``q8``/``q4`` quantize instead (``stock``: into mlx's own modules, see ``compact_model``)."""
    if layout == "native":
        return
    if layout in COMPACT:
        from octomil.quant.modules import compact_model

        compact_model(model, layout, stock=stock)
        return
    from mlx_lm.utils import dequantize_model

    if is_quantized(model):
        dequantize_model(model)
    model.set_dtype(DTYPES[layout])
    mx.eval(model.parameters())


def apply_layout(model: nn.Module, choice: LayoutChoice) -> LayoutChoice:
    """Convert ``model`` in place; then store float weights (in, out) if measured faster (once per
    machine, kept like the layout decision: the two storages round differently).

    Returns the choice with the storage decision filled in.
    """
    if choice.layout in COMPACT:
        from octomil.quant import kernel

        if not kernel.available():  # no compiler/cmake: the exact float32 layout instead
            why = f"{choice.layout} unavailable: {kernel.reason()}"
            choice = replace(choice, layout="float32", fallback=why)
    convert_precision(model, choice.layout)
    proj = _largest_projection(model.model.layers[0])
    if not isinstance(proj, nn.Linear):
        return choice

    def measure() -> dict[str, object]:
        storage = measure_storage(model)
        assert storage is not None
        return {"storage_ms": list(storage), "transposed": storage[1] < STORAGE_MARGIN * storage[0]}

    decision, cached = layout_cache.decide("storage", _decision_key(proj), measure)
    out_in, in_out = (float(t) for t in decision["storage_ms"])
    choice = replace(choice, storage_ms=(out_in, in_out), cached=choice.cached or cached)
    if not decision.get("transposed"):
        return choice
    from octomil.models.transposed import transpose_for_decode

    transpose_for_decode(model)
    return replace(choice, transposed=True)
