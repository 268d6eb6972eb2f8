"""Build an MLX C++ extension of Octomil's with CMake against the installed MLX wheel, once.

An extension is a directory of sources with a ``CMakeLists.txt`` (a custom primitive with a CPU
eval, MLX's CMake config from the wheel, nanobind for the binding, the way MLX intends). It is
built at first use into the user cache, keyed by a hash of its sources, MLX's and nanobind's
versions and the Python ABI, and renamed into place atomically so that concurrent first imports
never load half a file. Like ``octomil.blas.build`` a failure is a one-line reason (no cmake, no
compiler, no nanobind), and the caller falls back to MLX's own operations.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from types import ModuleType

from octomil.user_cache import cache_dir, default_cache_dir


def load_extension(module: str, sources: dict[str, bytes]) -> ModuleType:
    """Import ``module`` built from ``sources`` (file name -> bytes); RuntimeError says why not."""
    directory = str(built_extension(module, sources))
    if directory not in sys.path:
        sys.path.insert(0, directory)
    return importlib.import_module(module)


def built_extension(module: str, sources: dict[str, bytes]) -> Path:
    """The directory holding the built ``module`` (put it on ``sys.path``); builds it if missing."""
    key = hashlib.sha256()
    for file, text in sorted(sources.items()):
        key.update(file.encode() + b"\0" + text)
    versions = (_version("mlx"), _version("nanobind"), sysconfig.get_config_var("SOABI"))
    key.update(repr(versions).encode())
    name = f"{module.strip('_')}-{key.hexdigest()[:12]}"
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    # The same build in the default cache (made by `make setup`) serves a redirected cache too.
    for directory in dict.fromkeys((cache_dir(), default_cache_dir())):
        if (directory / "native" / name / f"{module}{suffix}").exists():
            return directory / "native" / name
    target = cache_dir() / "native" / name
    cmake = _tool("cmake")
    if not cmake:
        raise RuntimeError("no cmake to build it (pip install cmake)")
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
            src, out, build = Path(tmp) / "src", Path(tmp) / "out", Path(tmp) / "build"
            src.mkdir()
            for name, text in sources.items():
                (src / name).write_bytes(text)
            configure = [
                cmake, "-S", str(src), "-B", str(build),
                "-DCMAKE_BUILD_TYPE=Release",
                f"-DMLX_DIR={mlx_cmake}",
                f"-Dnanobind_DIR={nanobind.cmake_dir()}",
                f"-DPython_EXECUTABLE={sys.executable}",
                f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out}",
            ]  # fmt: skip
            ninja = _tool("ninja")
            if ninja:
                configure += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
            _run(configure)
            _run([cmake, "--build", str(build), "--parallel", "2"])
            built = next(out.glob(f"{module}*.so"), None)
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


def _tool(name: str) -> str | None:
    """``name`` from the PATH, or from the pip package of that name beside this Python."""
    beside = Path(sys.executable).parent / name
    return shutil.which(name) or (str(beside) if beside.exists() else None)


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
