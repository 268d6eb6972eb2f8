"""The BLAS under MLX's CPU backend: OpenBLAS, with Octomil's route for few-row products.

MLX's Linux CPU wheel links the reference (netlib) BLAS: a 32x576 @ 576x1536 matmul takes ~26 ms
there and ~0.8 ms with OpenBLAS. Loading OpenBLAS with ``RTLD_GLOBAL`` before ``mlx.core`` is
imported makes the dynamic linker resolve MLX's ``cblas_*``/``sgemm_`` symbols to it, except
``cblas_sgemm`` itself, which ``route`` places ahead of it to send few-row products to Octomil's
rows kernel (``native/``, compiled by ``build``).
This package must not import mlx itself.
"""

from __future__ import annotations

import ctypes
import os
import sys
import warnings

from octomil.blas import route

_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
)

_loaded: str | None = None
_reason = "not attempted"


def preload() -> str | None:
    """Load OpenBLAS globally (Linux only); return its path, or None with a one-time warning."""
    global _loaded, _reason
    if _loaded is not None or _reason != "not attempted":
        return _loaded
    if sys.platform != "linux":
        _reason = "Accelerate (macOS)" if sys.platform == "darwin" else "platform default"
        return None
    if os.environ.get("OCTOMIL_NO_BLAS_PRELOAD"):
        _reason = "disabled by OCTOMIL_NO_BLAS_PRELOAD"
        return None
    if "mlx.core" in sys.modules:
        _reason = "mlx was imported before octomil; bundled reference BLAS in use"
        warnings.warn(f"[engine] {_reason}: import octomil first for fast matmuls", stacklevel=2)
        return None
    override = os.environ.get("OCTOMIL_BLAS")
    for path in ((override,) if override else ()) + _CANDIDATES:
        if path and os.path.exists(path):
            try:
                # Opened locally first so the few-row route can be bound to it and then placed
                # ahead of it in the global scope; the second open makes the same object global.
                library = ctypes.CDLL(path, mode=ctypes.RTLD_LOCAL)
            except OSError:
                continue
            # Once loaded, the route is what MLX calls: load it only if it can be bound.
            has_both = hasattr(library, "cblas_sgemm") and hasattr(library, "cblas_sgemv")
            if has_both and route.load_before_blas():
                route.bind(library)
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            _loaded = path
            _reason = "loaded"
            return path
    _reason = "OpenBLAS not found (apt-get install libopenblas0-pthread)"
    warnings.warn(f"[engine] {_reason}; running on MLX's slow reference BLAS", stacklevel=2)
    return None


def describe() -> str:
    """One line for the startup log naming the BLAS in use."""
    if _loaded:
        return f"OpenBLAS ({_loaded}; {route.describe()})"
    if sys.platform == "darwin":
        return "Accelerate"
    return f"reference BLAS ({_reason})"


def is_fast() -> bool:
    return _loaded is not None or sys.platform == "darwin"
