"""The benchmark-only environment ``.bench-env/``: llama.cpp for the comparisons, built once.

It holds two builds of one llama.cpp version, both from the same PyPI sdist of llama-cpp-python:

- llama-cpp-python with its ``[server]`` extra: the bindings that ``llamacpp_runner.py`` drives in
  the performance report, and ``python -m llama_cpp.server``. That server takes one request at
  a time (one ``Llama`` behind a lock), so it cannot show what llama.cpp does for many users.
- ``llama-server``, llama.cpp's own server (parallel slots, continuous batching), compiled from
  the llama.cpp source vendored in that sdist: the anchor for serving many clients at once.

Both compile from source at nice 19 (~12 min for the bindings, ~10 more for the server on two
busy cores) and are then reused; a build started by another process is waited for, not
repeated. Start it early, in the background:

    .venv/bin/python benchmarks/bench_env.py            # both builds, then print the status
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH_ENV = ROOT / ".bench-env"
LLAMACPP_VERSION = "0.3.36"
LLAMACPP_PIN = f"llama-cpp-python[server]=={LLAMACPP_VERSION}"
BINDINGS, SERVER = "build", "server_build"  # marker-file prefixes of the two builds
NICE = ["nice", "-n", "19"]


def env_python(env: Path) -> Path:
    return env / "bin" / "python"


def server_binary(env: Path) -> Path:
    return env / "bin" / "llama-server"


def _run_python(env: Path, code: str) -> str | None:
    py = env_python(env)
    if not py.exists():
        return None
    done = subprocess.run([str(py), "-c", code], capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else None


def llamacpp_importable(env: Path) -> str | None:
    """llama-cpp-python's version in ``env``, or None."""
    return _run_python(
        env, "import llama_cpp, importlib.metadata as m; print(m.version('llama_cpp_python'))"
    )


def llamacpp_server_importable(env: Path) -> bool:
    """Whether ``python -m llama_cpp.server`` can start in ``env`` (the ``[server]`` extra)."""
    return _run_python(env, "import llama_cpp.server.app; print('ok')") == "ok"


def llama_server_version(env: Path) -> str | None:
    """``llama-server --version``'s first line, or None when it is not built."""
    binary = server_binary(env)
    if not binary.exists():
        return None
    done = subprocess.run([str(binary), "--version"], capture_output=True, text=True)
    lines = (done.stdout + done.stderr).strip().splitlines()
    return next((ln for ln in lines if ln.startswith("version")), lines[0] if lines else "?")


# --- build bookkeeping: <prefix>_started ("epoch pid"), <prefix>_finished, <prefix>_rc ------------


def _build_seconds(env: Path, prefix: str) -> float | None:
    try:
        started = float((env / f"{prefix}_started").read_text().split()[0])
        finished = float((env / f"{prefix}_finished").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return finished - started


def _build_running(env: Path, prefix: str) -> bool:
    """A build started (by this module, from any process) and not finished yet."""
    started = env / f"{prefix}_started"
    if not started.exists() or (env / f"{prefix}_finished").exists():
        return False
    fields = started.read_text().split()
    if len(fields) > 1:
        try:
            os.kill(int(fields[1]), 0)
            return True
        except (OSError, ValueError):
            return False
    return time.time() - float(fields[0]) < 3600


def _failed_before(env: Path, prefix: str) -> bool:
    rc = env / f"{prefix}_rc"
    return rc.exists() and rc.read_text().strip() != "0"


def _wait_for_other_build(env: Path, prefix: str, what: str) -> None:
    if _build_running(env, prefix):
        print(f"[bench-env] a {what} build is running in {env}; waiting", flush=True)
        while _build_running(env, prefix):
            time.sleep(20)


Step = list[str] | Callable[[], int]


def _build(env: Path, prefix: str, steps: list[Step]) -> int:
    """Run ``steps`` in order (commands at low priority, logged to ``<prefix>.log``, or callables
    returning an exit status); the first failing status, else 0."""
    env.mkdir(parents=True, exist_ok=True)
    for name in ("finished", "rc"):
        (env / f"{prefix}_{name}").unlink(missing_ok=True)
    (env / f"{prefix}_started").write_text(f"{time.time()} {os.getpid()}\n")
    rc = 0
    with open(env / f"{prefix}.log", "w") as log:
        for step in steps:
            if callable(step):
                rc = step()
            else:
                log.write(f"$ {' '.join(step)}\n")
                log.flush()
                rc = subprocess.run(
                    NICE + step,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=os.environ | {"CMAKE_BUILD_PARALLEL_LEVEL": "2"},
                ).returncode
            if rc != 0:
                break
    (env / f"{prefix}_rc").write_text(f"{rc}\n")
    (env / f"{prefix}_finished").write_text(f"{time.time()}\n")
    return rc


def _status(env: Path) -> dict:
    return {"env": str(env.relative_to(ROOT)) if env.is_relative_to(ROOT) else str(env)}


# --- llama-cpp-python (bindings + llama_cpp.server) ----------------------------------------------


def ensure_llamacpp(env: Path = BENCH_ENV, may_build: bool = True) -> dict:
    """Make llama-cpp-python (with its ``[server]`` extra) importable in ``env``; report status.

    An environment built before the extra was wanted gets only the extra's pure-Python
    packages added (seconds, no rebuild: the pinned version is already installed).
    """
    status = _status(env)
    have = llamacpp_importable(env)
    if have is None and _build_running(env, BINDINGS):
        if not may_build:
            return status | {"available": False, "reason": "its build is still running"}
        _wait_for_other_build(env, BINDINGS, "llama-cpp-python")
        have = llamacpp_importable(env)
    built_now = False
    if have is None:
        if _failed_before(env, BINDINGS):
            log = env / f"{BINDINGS}.log"
            return status | {
                "available": False,
                "reason": f"earlier build failed (see {log}; delete {env} to retry)",
            }
        if not may_build:
            return status | {"available": False, "reason": "not installed, building not allowed"}
        print(f"[bench-env] building {LLAMACPP_PIN} into {env} (~12 min, nice 19)", flush=True)
        if not env_python(env).exists():
            subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
        _build(env, BINDINGS, [[str(env_python(env)), "-m", "pip", "install", LLAMACPP_PIN]])
        have, built_now = llamacpp_importable(env), True
        if have is None:
            return status | {"available": False, "reason": f"build failed (see {env}/build.log)"}
    if may_build and not llamacpp_server_importable(env):
        pip = [str(env_python(env)), "-m", "pip", "install", "-q", LLAMACPP_PIN]
        subprocess.run(pip, check=False)
    return status | {
        "available": True,
        "version": have,
        "server": llamacpp_server_importable(env),
        "build_s": _build_seconds(env, BINDINGS),
        "built_now": built_now,
    }


# --- llama.cpp's own llama-server ----------------------------------------------------------------


def _server_steps(env: Path, work: Path) -> list[Step]:
    """Steps that compile ``llama-server`` (static, this CPU's instruction sets) from the sdist."""
    py, cmake = str(env_python(env)), str(env / "bin" / "cmake")
    src = work / f"llama_cpp_python-{LLAMACPP_VERSION}"
    build = work / "build"

    def unpack() -> int:
        with tarfile.open(work / f"llama_cpp_python-{LLAMACPP_VERSION}.tar.gz") as tar:
            tar.extractall(work, filter="data")
        return 0

    def install() -> int:
        shutil.copy2(build / "bin" / "llama-server", server_binary(env))
        return 0

    download = [py, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:"]
    configure = [
        cmake,
        "-S",
        str(src / "vendor" / "llama.cpp"),
        "-B",
        str(build),
        "-G",
        "Ninja",
        f"-DCMAKE_MAKE_PROGRAM={env / 'bin' / 'ninja'}",
        "-DCMAKE_BUILD_TYPE=Release",
        "-DBUILD_SHARED_LIBS=OFF",
        "-DLLAMA_BUILD_SERVER=ON",
        "-DLLAMA_BUILD_TOOLS=ON",
        "-DLLAMA_BUILD_TESTS=OFF",
        "-DLLAMA_BUILD_EXAMPLES=OFF",
        "-DLLAMA_CURL=OFF",
        "-DLLAMA_OPENSSL=OFF",
        # No web UI: it would be downloaded at build time (no network here, none needed).
        "-DLLAMA_BUILD_UI=OFF",
        "-DLLAMA_USE_PREBUILT_UI=OFF",
    ]
    return [
        [py, "-m", "pip", "install", "-q", "cmake", "ninja"],
        [*download, f"llama-cpp-python=={LLAMACPP_VERSION}", "-d", str(work)],
        unpack,
        configure,
        [cmake, "--build", str(build), "--target", "llama-server", "-j", "2"],
        install,
    ]


def ensure_llama_server(env: Path = BENCH_ENV, may_build: bool = True) -> dict:
    """Make ``.bench-env/bin/llama-server`` exist (llama.cpp of llama-cpp-python's sdist)."""
    status = _status(env)
    if llama_server_version(env) is None and _build_running(env, SERVER):
        if not may_build:
            return status | {"available": False, "reason": "its build is still running"}
        _wait_for_other_build(env, SERVER, "llama-server")
    built_now = False
    if llama_server_version(env) is None:
        if _failed_before(env, SERVER):
            log = env / f"{SERVER}.log"
            return status | {
                "available": False,
                "reason": f"earlier build failed (see {log}; delete {env / (SERVER + '_rc')} "
                "to retry)",
            }
        if not may_build:
            return status | {"available": False, "reason": "not built, building not allowed"}
        print(f"[bench-env] building llama-server {LLAMACPP_VERSION} (~10 min)", flush=True)
        if not env_python(env).exists():
            subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
        work = env / "src"
        shutil.rmtree(work, ignore_errors=True)
        _build(env, SERVER, _server_steps(env, work))
        shutil.rmtree(work, ignore_errors=True)  # ~1 GB of sources and objects
        built_now = True
        if llama_server_version(env) is None:
            return status | {"available": False, "reason": f"build failed (see {env}/{SERVER}.log)"}
    return status | {
        "available": True,
        "path": str(server_binary(env)),
        "version": llama_server_version(env),
        "build_s": _build_seconds(env, SERVER),
        "built_now": built_now,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--env", type=Path, default=BENCH_ENV)
    ap.add_argument("--status", action="store_true", help="only report, build nothing")
    args = ap.parse_args()
    status = {
        "llama_server": ensure_llama_server(args.env, may_build=not args.status),
        "llama_cpp_python": ensure_llamacpp(args.env, may_build=not args.status),
    }
    print(json.dumps(status, indent=2))


if __name__ == "__main__":
    main()
