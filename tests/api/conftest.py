"""Fixtures for the API tests: a real ``octomil serve`` subprocess on 127.0.0.1, one per module.

The server runs the real embedded model (SmolLM2-135M), so requests keep max_tokens small.
"""

import octomil  # noqa: F401, I001 - must precede anything that imports mlx (BLAS preload)

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

MODEL = "smollm2-135m"
STARTUP_TIMEOUT_S = 180.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def octomil_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "octomil.cli", *args]


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    port: int
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_server(*args: str) -> ServerProcess:
    """Start ``octomil serve`` with ``args`` and wait until /health answers 200."""
    port = free_port()
    log = Path(tempfile.mkstemp(prefix="octomil-serve-", suffix=".log")[1])
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            octomil_cmd("serve", "--host", "127.0.0.1", "--port", str(port), *args),
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    server = ServerProcess(proc, port, log)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"octomil serve exited {proc.returncode}:\n{server.output()}")
        try:
            if httpx.get(f"{server.base_url}/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    stop_server(server)
    raise RuntimeError(f"octomil serve did not become healthy:\n{server.output()}")


def stop_server(server: ServerProcess) -> None:
    server.proc.terminate()
    try:
        server.proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait(timeout=5)


@pytest.fixture(scope="module")
def server(request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    """One server per test module; a module sets ``SERVER_ARGS`` to pass flags."""
    args = getattr(request.module, "SERVER_ARGS", ("--speed-quality", "balanced"))
    srv = start_server(*args)
    try:
        yield srv
    finally:
        stop_server(srv)
