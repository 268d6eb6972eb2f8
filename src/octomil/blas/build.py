"""Compile the route's C sources (``native/``) into a shared object, once per source version.

The object is built with the system C compiler (``$CC``, ``cc`` or ``gcc``) into the user cache, or,
when that is not writable, into a private per-user temporary directory. It carries every
instruction-set variant and picks one at run time, so one built on one machine (a Docker build)
runs on another. Must not import mlx.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from importlib import resources
from pathlib import Path

from octomil.user_cache import cache_dir

# -ffp-contract=off: a multiply-add is fused only where the kernel says so, the same in every tile.
FLAGS = ("-O3", "-shared", "-fPIC", "-pthread", "-ffp-contract=off", "-fvisibility=hidden")
PREFIX = "blas_route-"


def built_object() -> Path:
    """The compiled route: the user cache's copy, else one built there (or, when the cache is not
    writable, in a per-user temporary directory). Raises RuntimeError with a one-line reason."""
    sources = _sources()
    digest = hashlib.sha256(repr(FLAGS).encode())
    for name, text in sorted(sources.items()):
        digest.update(name.encode() + b"\0" + text)
    name = f"{PREFIX}{digest.hexdigest()[:12]}.so"
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
            return _compile(compiler, sources, target)
        except OSError as error:  # not writable: try the next place
            failures.append(f"{target.parent}: {error}")
    raise RuntimeError("could not build it: " + "; ".join(failures))


def _sources() -> dict[str, bytes]:
    native = resources.files("octomil.blas").joinpath("native")
    return {
        entry.name: entry.read_bytes()
        for entry in native.iterdir()
        if entry.name.endswith((".c", ".h"))
    }


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


def _compile(compiler: str, sources: dict[str, bytes], target: Path) -> Path:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            for name, text in sources.items():
                (Path(tmp) / name).write_bytes(text)
            units = sorted(str(Path(tmp) / name) for name in sources if name.endswith(".c"))
            out = Path(tmp) / target.name
            cmd = [compiler, *FLAGS, *units, "-o", str(out)]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            if done.returncode != 0:
                raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[:300]}")
            os.replace(out, target)  # atomic: concurrent first imports never load half a file
    except subprocess.SubprocessError as error:
        raise RuntimeError(f"{compiler} failed: {error}") from error
    return target
