"""Route MLX's few-row fp32 products to Octomil's rows kernel (Linux CPU).

MLX's CPU backend computes every fp32 matmul with ``cblas_sgemm``, also a decode step's products
of one row, or of one row per sequence when a scheduler batches sequences. OpenBLAS 0.3.21
(Debian 12) packs the whole weight matrix for such a call (576x1536, one row: ~0.15 ms vs ~0.03 ms
through sgemv), its sgemv reads the weights once per row, and every sgemm (OpenBLAS, BLIS) picks
its summation order by the number of rows, so a row's bits change with the batch around it.

``native/route.c`` defines ``cblas_sgemm``; loaded with ``RTLD_GLOBAL`` *before* OpenBLAS it is
the definition the dynamic linker binds MLX to. Products of up to ``max_rows()`` rows go to the
rows kernel (``native/rows.c``: weights read once for all rows, split between two threads, each
row's result bitwise independent of the other rows), one-column products to OpenBLAS's sgemv,
everything else to OpenBLAS's sgemm. Results are the same products summed in another order than
sgemm's (fp32 rounding differences only).

Without a compiler, or with ``OCTOMIL_NO_BLAS_ROUTE=1``, every product stays on OpenBLAS's sgemm.
Must not import mlx.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Literal

from octomil.blas import build

DISABLE_ENV = "OCTOMIL_NO_BLAS_ROUTE"
_LEGACY_DISABLE_ENV = "OCTOMIL_NO_GEMV_ROUTE"  # the name before the rows kernel
Mode = Literal["off", "rows", "sgemv"]
# "sgemv" is the previous route (one OpenBLAS sgemv per row, up to 4 rows), kept to compare.
_MODES: tuple[Mode, ...] = ("off", "rows", "sgemv")  # index: the mode's number in route.c

_shim: ctypes.CDLL | None = None
_reason = "not attempted"


def load_before_blas() -> bool:
    """Build (once) and load the route globally; call before the BLAS library is loaded."""
    global _shim, _reason
    if _shim is not None:
        return True
    for name in (DISABLE_ENV, _LEGACY_DISABLE_ENV):
        if os.environ.get(name):
            _reason = f"disabled by {name}"
            return False
    try:
        path = build.built_object()
    except RuntimeError as error:
        _reason = str(error)
        return False
    shim = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    shim.octomil_route_calls.restype = ctypes.c_ulonglong
    shim.octomil_rows_isa.restype = ctypes.c_char_p
    shim.octomil_rows_select_isa.argtypes = [ctypes.c_char_p]
    _shim = shim
    return True


def bind(blas: ctypes.CDLL) -> bool:
    """Hand the route the BLAS's own sgemm and sgemv; until then it must not be called."""
    global _reason
    if _shim is None:
        return False
    sgemm = ctypes.cast(blas.cblas_sgemm, ctypes.c_void_p)
    sgemv = ctypes.cast(blas.cblas_sgemv, ctypes.c_void_p)
    _shim.octomil_route_init(sgemm, sgemv)
    _reason = "active"
    return True


def active() -> bool:
    return _reason == "active"


def reason() -> str:
    return _reason


def describe() -> str:
    """What the route does, for the startup line, or why it is not there."""
    if not active():
        return f"few-row products via sgemm: route {_reason}"
    return f"1-{max_rows()} rows via octomil rows kernel ({isa()})"


def max_rows() -> int:
    """Products of up to this many rows go to the rows kernel (0 when the route is not active)."""
    return int(_library().octomil_route_max_rows()) if active() else 0


def isa() -> str:
    """The instruction set the rows kernel runs with on this CPU: avx512, avx2 or generic."""
    return _library().octomil_rows_isa().decode() if active() else ""


def select_isa(name: str) -> bool:
    """Use another instruction set of this CPU for the rows kernel (tests); False if it lacks it."""
    return bool(_library().octomil_rows_select_isa(name.encode()))


def library() -> ctypes.CDLL:
    """The loaded route: its ``cblas_sgemm`` is the routed one (benchmarks call it directly)."""
    return _library()


@contextmanager
def using(mode: Mode) -> Iterator[None]:
    """Route products the given way while inside: "off" sends every product to OpenBLAS's sgemm
    (stock MLX), "sgemv" uses the previous route (one sgemv per row, up to 4 rows).

    A product reads the switch when MLX's stream thread runs it, so MLX is drained on the way in
    and out: work queued before (or run ahead inside) keeps the setting it was queued under.
    """
    if not active():
        yield
        return
    import mlx.core as mx  # by now mlx is loaded; this module must not load it first

    mx.synchronize()
    before = set_mode(mode)
    try:
        yield
    finally:
        mx.synchronize()
        set_mode(before)


def set_mode(mode: Mode) -> Mode:
    """Switch the route now and return the previous mode; with MLX work in flight use ``using``."""
    shim = _library()
    before = int(shim.octomil_route_mode())
    shim.octomil_route_set_mode(_MODES.index(mode))
    return _MODES[before]


def disabled() -> AbstractContextManager[None]:
    """Every product through OpenBLAS's sgemm while inside (stock MLX, for benchmarks)."""
    return using("off")


def routed_calls() -> int:
    """How many products the route kept from OpenBLAS's sgemm so far (a diagnostic for tests)."""
    if not active():
        return 0
    return int(_library().octomil_route_calls())


def _library() -> ctypes.CDLL:
    if _shim is None:
        raise RuntimeError(f"the BLAS route is not loaded ({_reason})")
    return _shim
