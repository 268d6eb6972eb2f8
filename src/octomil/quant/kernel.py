"""The qmm extension, loaded once: quantized products inside MLX graphs (see ``native/qkernel.c``).

``quantized_matmul(x, w, scales, biases, group_size, bits)`` computes ``x @ dequantize(w).T`` for
MLX affine 4/8-bit weights (MLX's packing: ``w`` uint32 (n, k * bits / 32), scales and biases
(n, k / group_size), both fp32 or both fp16) with fp32 activations, as a lazy MLX op. Up to
``max_rows()`` rows read the weights once for all rows; more rows dequantize blocks for sgemm.
On x86 CPUs with AVX2 the few-row kernel rounds each block of 32 inputs to int8 (llama.cpp's
trade, with centred codes; ``activations()`` says which); prefill keeps fp32 activations.

Without cmake/a C++ compiler/nanobind, or with ``OCTOMIL_NO_QMM=1``, ``available()`` is False with
a one-line ``reason()`` and the loader keeps fp32 weights.
"""

from __future__ import annotations

import os
import sys
from types import ModuleType

import mlx.core as mx

DISABLE_ENV = "OCTOMIL_NO_QMM"

_module: ModuleType | None = None
_reason = "not attempted"


def load() -> ModuleType | None:
    """Build (once per version) and import the extension; None with ``reason()`` when it cannot."""
    global _module, _reason
    if _module is not None or _reason != "not attempted":
        return _module
    if os.environ.get(DISABLE_ENV):
        _reason = f"disabled by {DISABLE_ENV}"
        return None
    from octomil.quant import build

    try:
        where = build.built_extension()
    except RuntimeError as error:
        _reason = str(error)
        return None
    sys.path.insert(0, str(where))
    try:
        import _octomil_qmm
    except ImportError as error:
        _reason = f"could not import it: {error}"
        return None
    finally:
        sys.path.remove(str(where))
    _module = _octomil_qmm
    _reason = "active"
    return _module


def available() -> bool:
    return load() is not None


def reason() -> str:
    load()
    return _reason


def _required() -> ModuleType:
    module = load()
    if module is None:
        raise RuntimeError(f"octomil's quantized kernel is not available ({_reason})")
    return module


def quantized_matmul(
    x: mx.array, w: mx.array, scales: mx.array, biases: mx.array, group_size: int, bits: int
) -> mx.array:
    """``x @ dequantize(w, scales, biases, group_size, bits).T`` in fp32, lazily."""
    return _required().quantized_matmul(x, w, scales, biases, group_size, bits)


def max_rows() -> int:
    """Products of up to this many rows take the few-row kernel."""
    return int(_required().max_rows)


def isa() -> str:
    """The few-row kernel this CPU runs: avx512vnni-int8, avxvnni-int8, avx2-int8 (int8
    activations), avx512, avx2 or generic (fp32 activations); ``OCTOMIL_QMM_ISA`` picks one."""
    return str(_required().isa())


def activations() -> str:
    """What the few-row kernel multiplies the weights with: "int8" or "float32" rows."""
    return "int8" if isa().endswith("-int8") else "float32"


def select_isa(name: str) -> bool:
    """Use another instruction set this CPU has (tests); False if it lacks it."""
    return bool(_required().select_isa(name))


def calls(prefill: bool = False) -> int:
    """Products run so far by the few-row kernel, or (``prefill``) by dequantize-and-sgemm."""
    return int(_required().calls(prefill))


def describe() -> str:
    if not available():
        return f"quantized kernel unavailable: {_reason}"
    return (
        f"octomil qmm ({isa()}, 1-{max_rows()} rows few-row kernel on {activations()} "
        "activations, more via sgemm)"
    )
