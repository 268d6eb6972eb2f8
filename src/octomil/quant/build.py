"""Build the qmm extension (``native/``) with CMake against the installed MLX wheel, once per
version.

The extension is an MLX C++ extension the way MLX intends one (a custom primitive with a CPU eval,
MLX's CMake config from ``python -m mlx --cmake-dir``, nanobind for the binding). It is built at
first use into the user cache, keyed by a hash of its sources, MLX's and nanobind's versions and
the Python ABI, and renamed into place atomically so concurrent first imports never load half a
file. It carries every instruction-set variant and picks one at run time. Like
``octomil.blas.build`` it falls back with a one-line reason (no cmake, no compiler, no nanobind).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from importlib import resources
from pathlib import Path

from octomil.user_cache import cache_dir

MODULE = "_octomil_qmm"
# pool.c and native.h are the few-row BLAS route's worker thread, compiled in a second time.
_SHARED = ("pool.c", "native.h")


def built_extension() -> Path:
    """The directory holding the built module (put it on ``sys.path``); builds it when missing.
    Raises RuntimeError with a one-line reason."""
    sources = _sources()
    key = hashlib.sha256()
    for name, text in sorted(sources.items()):
        key.update(name.encode() + b"\0" + text)
    key.update(
        repr((_version("mlx"), _version("nanobind"), sysconfig.get_config_var("SOABI"))).encode()
    )
    name = f"qmm-{key.hexdigest()[:12]}"
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    # A build in the default cache serves a process pointed at another one (tests, benchmarks).
    for place in (cache_dir(), Path.home() / ".cache" / "octomil"):
        if (place / "native" / name / f"{MODULE}{suffix}").exists():
            return place / "native" / name
    target = cache_dir() / "native" / name
    cmake = shutil.which("cmake")
    if not cmake:
        raise RuntimeError("no cmake to build it (apt-get install cmake g++)")
    if not (shutil.which("c++") or shutil.which("g++")):
        raise RuntimeError("no C++ compiler to build it (apt-get install g++)")
    try:
        import mlx
        import nanobind
    except ImportError as error:
        raise RuntimeError(f"cannot build it: {error}") from None
    mlx_cmake = Path(next(iter(mlx.__path__))) / "share" / "cmake" / "MLX"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            src, out = Path(tmp) / "src", Path(tmp) / "out"
            src.mkdir()
            for name, text in sources.items():
                (src / name).write_bytes(text)
            configure = [
                cmake, "-S", str(src), "-B", str(Path(tmp) / "build"),
                "-DCMAKE_BUILD_TYPE=Release",
                f"-DMLX_DIR={mlx_cmake}",
                f"-Dnanobind_DIR={nanobind.cmake_dir()}",
                f"-DPython_EXECUTABLE={sys.executable}",
                f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out}",
            ]  # fmt: skip
            if shutil.which("ninja"):
                configure += ["-G", "Ninja"]
            _run(configure)
            _run([cmake, "--build", str(Path(tmp) / "build"), "--parallel", "2"])
            built = next(out.glob(f"{MODULE}*.so"), None)
            if built is None:
                raise RuntimeError("cmake finished without the module")
            staged = Path(tmp) / "staged"
            staged.mkdir()
            shutil.copy2(built, staged / built.name)
            try:
                os.replace(staged, target)  # atomic: another process may have won the race
            except OSError:
                if not target.exists():
                    raise
    except OSError as error:
        raise RuntimeError(f"could not build it in {target.parent}: {error}") from None
    return target


def _run(cmd: list[str]) -> None:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except subprocess.SubprocessError as error:
        raise RuntimeError(f"{cmd[0]} failed: {error}") from None
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip()[-400:]
        raise RuntimeError(f"{Path(cmd[0]).name} failed: {tail}")


def _version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "missing"


def _sources() -> dict[str, bytes]:
    native = resources.files("octomil.quant").joinpath("native")
    files = {
        entry.name: entry.read_bytes()
        for entry in native.iterdir()
        if entry.name.endswith((".c", ".h", ".cpp", ".txt"))
    }
    blas = resources.files("octomil.blas").joinpath("native")
    files.update({name: blas.joinpath(name).read_bytes() for name in _SHARED})
    return files
