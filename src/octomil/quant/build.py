"""The sources of the qmm extension (``native/``), built by ``octomil.native_extension``.

The extension is an MLX C++ extension the way MLX intends one (a custom primitive with a CPU eval,
MLX's CMake config from the installed wheel, nanobind for the binding), built once per source
version into the user cache. It carries every instruction-set variant and picks one at run time.
It shares the few-row BLAS route's worker thread code (``pool.c``), compiled in a second time,
and the decode kernels' gathering of strided inputs (``strided_rows.h``).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from octomil.native_extension import built_extension as _build

MODULE = "_octomil_qmm"
_SHARED = ("pool.c", "native.h")
_SHARED_WITH_DECODE = ("strided_rows.h",)


def built_extension() -> Path:
    """The directory holding the built module (put it on ``sys.path``); builds it when missing.
    Raises RuntimeError with a one-line reason."""
    return _build(MODULE, _sources())


def _sources() -> dict[str, bytes]:
    native = resources.files("octomil.quant").joinpath("native")
    files = {
        entry.name: entry.read_bytes()
        for entry in native.iterdir()
        if entry.name.endswith((".c", ".h", ".cpp", ".txt"))
    }
    blas = resources.files("octomil.blas").joinpath("native")
    files.update({name: blas.joinpath(name).read_bytes() for name in _SHARED})
    kernels = resources.files("octomil.kernels").joinpath("native")
    files.update({name: kernels.joinpath(name).read_bytes() for name in _SHARED_WITH_DECODE})
    return files
