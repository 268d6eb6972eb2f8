"""The servers of the serving benchmark: how each kind starts, when it is ready, how it stops.

A configuration is ``NAME=KIND[:ARGS]``: a label, one of the kinds below, and extra command-line
arguments for it (shell-quoted). ``{concurrency}`` in the arguments is replaced by the level's
client count, and a configuration that uses it is restarted for every level (so llama.cpp's
parallel slots and mlx-lm's decode batch equal the number of clients); others serve all levels
from one process. Kinds, all on the same model:

- ``octomil``: ``octomil serve`` on the embedded GGUF (fp32 weights in memory);
- ``llama.cpp``: llama.cpp's own ``llama-server`` on the same GGUF file (Q4_1), parallel slots
  and continuous batching, 2 threads (``bench_env.py`` builds it);
- ``llama-cpp-python``: ``python -m llama_cpp.server`` on the same file; one request at a time
  (queued; its stream carries no usage, so tokens are counted as content chunks);
- ``mlx-lm``: stock ``mlx_lm.server`` on the same weights dequantized to fp32
  (``mlx_model_dir.py``), with OpenBLAS preloaded as the BRIEF's stock baseline has it.

Every server runs as a child process in its own session on 127.0.0.1 with a free port, output to
a log file; it is stopped by its process group (SIGINT, then SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from bench_env import llama_server_version, llamacpp_importable

KINDS = ("octomil", "llama.cpp", "llama-cpp-python", "mlx-lm")
# Context per llama.cpp slot: the longest prompt (~1,500 tokens) plus max_tokens, with room.
CTX_PER_SLOT = 2048
# The model name each kind is sent; None: the first id its /v1/models lists.
MODEL_NAME = {"mlx-lm": "default_model"}
OPENBLAS = Path(f"/usr/lib/{platform.machine()}-linux-gnu/openblas-pthread/libopenblas.so.0")


@dataclass(frozen=True)
class ServerConfig:
    name: str
    kind: str
    args: tuple[str, ...] = ()

    @property
    def per_level(self) -> bool:
        """Restarted for each level: its arguments (or its kind's) depend on the client count."""
        return self.kind in ("llama.cpp", "mlx-lm") or any("{concurrency}" in a for a in self.args)


def parse_config(spec: str) -> ServerConfig:
    """``NAME=KIND[:ARGS]`` or ``KIND`` (named after itself)."""
    name, _, rest = spec.partition("=") if "=" in spec else (spec.partition(":")[0], "", spec)
    kind, _, args = rest.partition(":")
    if kind not in KINDS:
        raise ValueError(f"unknown server kind {kind!r} in {spec!r} (one of {', '.join(KINDS)})")
    return ServerConfig(name.strip(), kind, tuple(shlex.split(args)))


@dataclass(frozen=True)
class Paths:
    """Where the servers' programs and model files are."""

    python: Path  # the project's venv python (octomil, mlx-lm)
    bench_env: Path  # llama.cpp builds
    gguf: Path
    mlx_dir: Path | None  # stock mlx-lm model directory (made on demand)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(
    config: ServerConfig,
    paths: Paths,
    port: int,
    concurrency: int,
    max_concurrency: int,
    threads: int,
) -> tuple[list[str], dict[str, str]]:
    """(argv, extra environment) that start ``config`` for a level of ``concurrency`` clients."""
    host = ["--host", "127.0.0.1", "--port", str(port)]
    env: dict[str, str] = {}
    bindir = paths.python.parent
    if config.kind == "octomil":
        # Admission must let every client in: more would get HTTP 429.
        argv = [
            str(bindir / "octomil"),
            "serve",
            *host,
            "--max-concurrency",
            str(2 * max_concurrency),
        ]
    elif config.kind == "llama.cpp":
        argv = [
            str(paths.bench_env / "bin" / "llama-server"),
            *("-m", str(paths.gguf), *host),
            *("-np", str(concurrency), "-c", str(concurrency * CTX_PER_SLOT)),
            *("-t", str(threads), "-tb", str(threads)),
        ]
    elif config.kind == "llama-cpp-python":
        argv = [
            str(paths.bench_env / "bin" / "python"),
            *("-m", "llama_cpp.server", "--model", str(paths.gguf), *host),
            *("--n_ctx", str(CTX_PER_SLOT), "--n_threads", str(threads)),
            *("--n_threads_batch", str(threads)),
            # By default a new request interrupts the one streaming: queue them instead.
            *("--interrupt_requests", "False"),
        ]
    else:  # mlx-lm
        assert paths.mlx_dir is not None
        argv = [
            str(paths.python),
            *("-m", "mlx_lm.server", "--model", str(paths.mlx_dir), *host),
            *("--decode-concurrency", str(concurrency), "--temp", "0"),
        ]
        if OPENBLAS.exists():
            env["LD_PRELOAD"] = str(OPENBLAS)
    extra = [a.replace("{concurrency}", str(concurrency)) for a in config.args]
    return argv + extra, env


class Server:
    """One running server process; a context manager that always stops it."""

    def __init__(self, argv: list[str], env: dict[str, str], port: int, log_path: Path) -> None:
        self.argv, self.port, self.log_path = argv, port, log_path
        self.base_url = f"http://127.0.0.1:{port}"
        self._log = open(log_path, "w")
        # No hub access from any server: everything it needs is local.
        full_env = os.environ | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"} | env
        self.proc = subprocess.Popen(
            argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=full_env,
            start_new_session=True,
        )

    def log_tail(self, lines: int = 15) -> str:
        return "".join(self.log_path.read_text(errors="replace").splitlines(True)[-lines:])

    def wait_ready(self, timeout: float, model: str | None = None) -> str:
        """Wait until the server answers; return the model name to send.

        With ``model`` given, readiness is ``/health`` (mlx-lm's ``/v1/models`` lists the Hugging
        Face cache instead of the served model, and fails when there is none); else the first id
        that ``/v1/models`` lists.
        """
        path = "/health" if model else "/v1/models"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"exited with {self.proc.returncode}; log:\n{self.log_tail()}")
            try:
                r = httpx.get(f"{self.base_url}{path}", timeout=5)
                if r.status_code == 200:
                    return model or r.json()["data"][0]["id"]
            except (httpx.HTTPError, ValueError, KeyError, IndexError):
                pass
            time.sleep(0.5)
        raise RuntimeError(f"not ready after {timeout:.0f} s; log:\n{self.log_tail()}")

    def startup_lines(self, limit: int = 8) -> list[str]:
        """The server's own bracketed startup lines (Octomil's ``[engine] ...``), if any."""
        text = self.log_path.read_text(errors="replace")
        return [ln for ln in text.splitlines() if ln.startswith("[")][:limit]

    def stop(self) -> None:
        for sig, wait in ((signal.SIGINT, 20), (signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            if self.proc.poll() is not None:
                break
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(wait)
            except subprocess.TimeoutExpired:
                continue
        self._log.close()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def versions(paths: Paths) -> dict[str, str | None]:
    """Versions of every server program (None where it is not installed)."""
    probe = "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))"

    def version_in(python: Path, dist: str) -> str | None:
        done = subprocess.run([str(python), "-c", probe, dist], capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else None

    return {
        "python": sys.version.split()[0],
        "octomil": version_in(paths.python, "octomil"),
        "mlx": version_in(paths.python, "mlx"),
        "mlx_lm": version_in(paths.python, "mlx-lm"),
        "httpx": httpx.__version__,
        "llama_cpp_python": llamacpp_importable(paths.bench_env),
        "llama_server": llama_server_version(paths.bench_env),
    }
