"""The decode kernels extension (``native/decode_kernels.cpp``): loaded once, or a reason why not.

MLX's Linux CPU backend computes ``exp`` one element at a time (~20-35 ns an element), so SiLU
and attention's softmax grow with every row a decode step serves, and its attention costs ~20
operations per sequence and layer. The extension's primitives (a vectorised SwiGLU, one attention
operation for all one-token sequences of a step, log-sum-exp and entropy over the vocabulary) are
what make batched decode steps cheap; see the C++ file for the invariant that keeps batching exact.

``OCTOMIL_NO_DECODE_KERNELS=1`` turns them off (MLX's own operations, as stock mlx-lm);
:func:`disabled` does so for a block (benchmarks compare both in one process). Without cmake, a
C++ compiler or nanobind they are off, with the reason in :func:`status`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from types import ModuleType

import mlx.core as mx

_module: ModuleType | None = None
_reason = ""
_loaded = False
_off = 0


def _sources() -> dict[str, bytes]:
    native = resources.files("octomil.kernels").joinpath("native")
    return {
        e.name: e.read_bytes() for e in native.iterdir() if e.name.endswith((".cpp", ".h", ".txt"))
    }


def extension() -> ModuleType | None:
    """The loaded extension, or None (off, or it could not be built: see :func:`status`)."""
    global _module, _reason, _loaded
    if _off:
        return None
    if not _loaded:
        _loaded = True
        if os.environ.get("OCTOMIL_NO_DECODE_KERNELS"):
            _reason = "off (OCTOMIL_NO_DECODE_KERNELS)"
        else:
            from octomil.native_extension import load_extension

            try:
                _module = load_extension("_octomil_decode", _sources())
            except (RuntimeError, ImportError) as error:
                _reason = f"unavailable: {error}"
    return _module


def status() -> str:
    """One phrase for the startup line: which decode kernels are active, or why none are."""
    ext = extension()
    if ext is not None:
        return f"decode kernels ({ext.isa()})"
    return "decode kernels off (disabled)" if _off else f"decode kernels {_reason}"


@contextmanager
def disabled() -> Iterator[None]:
    """MLX's own operations for decode steps inside the block."""
    global _off
    _off += 1
    try:
        yield
    finally:
        _off -= 1


def logsumexp(x: mx.array) -> mx.array:
    """``mx.logsumexp(x, axis=-1, keepdims=True)``, one vectorised pass when the kernels are on."""
    ext = extension()
    if ext is None or x.dtype != mx.float32:
        return mx.logsumexp(x, axis=-1, keepdims=True)
    return ext.logsumexp(x)[..., None]


def entropy(x: mx.array) -> mx.array:
    """Shannon entropy (nats) of ``softmax(x)`` over the last axis."""
    ext = extension()
    x = x.astype(mx.float32)
    if ext is None:  # -inf logits (masked tokens) count as probability 0, as in the kernel
        logp = x - mx.logsumexp(x, axis=-1, keepdims=True)
        return -mx.where(mx.isinf(logp), 0.0, mx.exp(logp) * logp).sum(axis=-1)
    return ext.entropy(x)
