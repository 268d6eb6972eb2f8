"""``octomil serve`` flag errors (one line, non-zero, no traceback), ``octomil models``, and /health
answering 503 until the model is loaded."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import threading

import httpx
import pytest
from conftest import MODEL, free_port, octomil_cmd

from octomil.engine.engine import Engine
from octomil.server.app import create_app


def _serve(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        octomil_cmd("serve", *args), capture_output=True, text=True, timeout=timeout
    )


def _one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (("--early-exit-threshold", "1.5"), ("threshold", "[0, 1]")),
        (("--early-exit-threshold", "-0.2"), ("threshold",)),
        (("--speed-quality", "ludicrous"), ("ludicrous", "balanced")),
        (("--port", "70000"), ("--port",)),
        (("--max-concurrency", "0"), ("--max-concurrency",)),
        (("no-such-model-xyz",), ("no-such-model-xyz",)),
    ],
)
def test_bad_flags_fail_with_one_line(args: tuple[str, ...], needles: tuple[str, ...]) -> None:
    _one_line_error(_serve("--port", str(free_port()), *args), *needles)


def test_port_in_use_fails_before_loading_the_model() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = _serve("--host", "127.0.0.1", "--port", str(port), timeout=30)
    _one_line_error(proc, "already in use", str(port))
    assert "[engine]" not in proc.stdout


def test_models_lists_the_embedded_default() -> None:
    proc = subprocess.run(octomil_cmd("models"), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    line = next(line for line in proc.stdout.splitlines() if MODEL in line)
    assert line.startswith("*") and " yes " in line


def test_help_lists_serve_options() -> None:
    proc = subprocess.run(
        octomil_cmd("serve", "--help"),
        capture_output=True,
        text=True,
        timeout=60,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0
    for flag in (
        "--early-exit-threshold",
        "--speed-quality",
        "--api-key",
        "--max-concurrency",
        "--no-telemetry-headers",
        "--host",
        "--port",
    ):
        assert flag in proc.stdout


def test_health_is_503_until_the_model_is_loaded() -> None:
    """In-process uvicorn with the real loader held back by a gate."""
    import uvicorn

    gate = threading.Event()

    def loader() -> Engine:
        gate.wait(60)
        return Engine.load()

    port = free_port()
    app = create_app(loader=loader)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            if server.started:
                break
            threading.Event().wait(0.05)
        r = httpx.get(f"{base}/health")
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "model_not_ready"
        r = httpx.post(f"{base}/v1/completions", json={"model": MODEL, "prompt": "x"})
        assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable"
        gate.set()
        for _ in range(600):
            r = httpx.get(f"{base}/health")
            if r.status_code == 200:
                break
            threading.Event().wait(0.1)
        assert r.status_code == 200
        r = httpx.post(
            f"{base}/v1/completions",
            json={"model": MODEL, "prompt": "Hello", "max_tokens": 2},
            timeout=60,
        )
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 2
    finally:
        gate.set()
        server.should_exit = True
        thread.join(20)
