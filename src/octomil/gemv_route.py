"""Route MLX's few-row fp32 products from OpenBLAS's sgemm to its sgemv (Linux CPU).

MLX's CPU backend computes every fp32 matmul with ``cblas_sgemm``, also a decode step's
one-row products. OpenBLAS 0.3.21 (Debian 12) packs the whole weight matrix for such a call:
a 576x1536 product takes ~0.15 ms through sgemm and ~0.03 ms through sgemv, the 49152x576 LM
head ~7.4 ms vs ~2.5 ms. ``native/gemv_route.c`` defines ``cblas_sgemm``; loaded with
``RTLD_GLOBAL`` *before* OpenBLAS it is the definition the dynamic linker binds MLX to, sends
products of up to 4 rows (one sgemv per row: a decode step plus early-exit catch-up rows) and
of one column to sgemv, and every other call to OpenBLAS's sgemm. Results are the same
products summed in another order (fp32 rounding differences only); each row's result is what a
one-row product of that row gives.

The object is compiled once per source version with the system C compiler (``$CC``, ``cc`` or
``gcc``) into the user cache (or a private per-user temporary directory). Without a
compiler, or with ``OCTOMIL_NO_GEMV_ROUTE=1``, products stay on sgemm. Must not import mlx.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path

from octomil.user_cache import cache_dir

DISABLE_ENV = "OCTOMIL_NO_GEMV_ROUTE"
_SOURCE = "gemv_route.c"

_shim: ctypes.CDLL | None = None
_reason = "not attempted"


def load_before_blas() -> bool:
    """Build (once) and load the route globally; call before the BLAS library is loaded."""
    global _shim, _reason
    if _shim is not None:
        return True
    if os.environ.get(DISABLE_ENV):
        _reason = f"disabled by {DISABLE_ENV}"
        return False
    try:
        path = _built_object()
    except RuntimeError as error:
        _reason = str(error)
        return False
    _shim = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    _shim.octomil_gemv_routed_calls.restype = ctypes.c_ulonglong
    return True


def bind(blas: ctypes.CDLL) -> bool:
    """Hand the route the BLAS's own sgemm and sgemv; until then it must not be called."""
    global _reason
    if _shim is None:
        return False
    sgemm = ctypes.cast(blas.cblas_sgemm, ctypes.c_void_p)
    sgemv = ctypes.cast(blas.cblas_sgemv, ctypes.c_void_p)
    _shim.octomil_gemv_route_init(sgemm, sgemv)
    _reason = "active"
    return True


def active() -> bool:
    return _reason == "active"


def reason() -> str:
    return _reason


@contextmanager
def disabled() -> Iterator[None]:
    """Every product through OpenBLAS's sgemm while inside (stock MLX, for benchmarks).

    A product reads the switch when MLX's stream thread runs it, so MLX is drained on the way in
    and out: work queued before (or run ahead inside) keeps the setting it was queued under.
    """
    if not active():
        yield
        return
    import mlx.core as mx  # by now mlx is loaded; this module must not load it first

    assert _shim is not None
    mx.synchronize()
    _shim.octomil_gemv_route_enable(0)
    try:
        yield
    finally:
        mx.synchronize()
        _shim.octomil_gemv_route_enable(1)


def routed_calls() -> int:
    """How many products went to sgemv so far (a diagnostic for tests)."""
    if not active():
        return 0
    assert _shim is not None
    return int(_shim.octomil_gemv_routed_calls())


def _built_object() -> Path:
    """The compiled route: the user cache's copy, else one built there (or, when the cache is not
    writable, in a per-user temporary directory)."""
    source = resources.files("octomil").joinpath("native", _SOURCE).read_bytes()
    name = f"gemv_route-{hashlib.sha256(source).hexdigest()[:12]}.so"
    places = [cache_dir() / "native" / name]
    private = _private_temp_dir()
    if private is not None:
        places.append(private / name)
    for target in places:
        if target.exists():
            return target
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        raise RuntimeError("no C compiler to build it (apt-get install gcc)")
    failures = []
    for target in places:
        try:
            return _compile(compiler, source, target)
        except OSError as error:  # not writable: try the next place
            failures.append(f"{target.parent}: {error}")
    raise RuntimeError("could not build it: " + "; ".join(failures))


def _private_temp_dir() -> Path | None:
    """``$TMPDIR/octomil-<uid>/native`` if this user alone owns and can write it: a shared temporary
    directory must not let another user plant the object this process loads."""
    base = Path(tempfile.gettempdir()) / f"octomil-{os.getuid()}"
    try:
        base.mkdir(mode=0o700, exist_ok=True)
        info = base.stat()
    except OSError:
        return None
    if info.st_uid != os.getuid() or info.st_mode & 0o077:
        return None
    return base / "native"


def _compile(compiler: str, source: bytes, target: Path) -> Path:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            src, out = Path(tmp) / _SOURCE, Path(tmp) / target.name
            src.write_bytes(source)
            cmd = [compiler, "-O2", "-shared", "-fPIC", "-nostdlib", str(src), "-o", str(out)]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            if done.returncode != 0:
                raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[:300]}")
            os.replace(out, target)  # atomic: concurrent first imports never load half a file
    except subprocess.SubprocessError as error:
        raise RuntimeError(f"{compiler} failed: {error}") from error
    return target
