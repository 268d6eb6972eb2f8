"""``octomil serve --ray``: a local Ray cluster, 2 replicas behind Ray Serve's proxy, real SDK.

One cluster for the module (Ray and two model loads take ~30-60 s on this machine). The tests
run in file order: the replica kill and the shutdown come last. All traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'octomil[ray]')")

from conftest import (  # noqa: E402
    MODEL,
    ServerProcess,
    free_port,
    octomil_cmd,
    start_server,
)

pytestmark = pytest.mark.slow

MESSAGES = [{"role": "user", "content": "Name three colors."}]
REPLICA = "x-octomil-replica"


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (the local cluster's raylet, GCS, proxy and replicas)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def replica_pids(server: ServerProcess) -> list[int]:
    return sorted(p for p in descendants(server.proc.pid) if "ServeReplica:octomil" in cmdline(p))


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.fixture(scope="module")
def metrics_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def ray_server(metrics_port: int) -> Iterator[ServerProcess]:
    srv = start_server("--ray", "--replicas", "2", "--metrics-port", str(metrics_port))
    # Ready when the proxy has routed to both replicas (it learns of them asynchronously).
    seen: set[str] = set()
    deadline = time.monotonic() + 120
    while len(seen) < 2 and time.monotonic() < deadline:
        seen.add(httpx.get(f"{srv.base_url}/health", timeout=30).headers[REPLICA])
        time.sleep(0.1)
    srv.ray_pids = descendants(srv.proc.pid)  # type: ignore[attr-defined]
    try:
        yield srv
    finally:
        if srv.proc.poll() is None:  # the shutdown test did not run or failed
            srv.proc.send_signal(signal.SIGTERM)
            try:
                srv.proc.wait(timeout=60)
            except Exception:  # noqa: BLE001
                srv.proc.kill()
        for pid in descendants(srv.proc.pid) | srv.ray_pids:  # type: ignore[attr-defined]
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def client(ray_server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{ray_server.base_url}/v1", api_key="none", timeout=120)


@pytest.fixture(scope="module")
def reference(client: openai.OpenAI) -> str:
    """The greedy answer; every replica must give the same one."""
    out = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0
    )
    return out.choices[0].message.content or ""


def test_concurrent_sdk_requests_spread_over_both_replicas(
    client: openai.OpenAI, reference: str
) -> None:
    def ask(_: int) -> tuple[str, dict[str, str]]:
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0
        )
        return raw.parse().choices[0].message.content or "", dict(raw.headers)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(ask, range(8)))
    assert [text for text, _ in results] == [reference] * 8
    assert len({headers[REPLICA] for _, headers in results}) == 2
    for _, headers in results:  # the same telemetry headers as plain `octomil serve`
        assert headers["x-octomil-total-layers"] == "30"
        assert headers["x-octomil-avg-layers-used"] == "30.0"


def test_streaming_passes_through_the_proxy(client: openai.OpenAI, reference: str) -> None:
    with client.chat.completions.with_streaming_response.create(
        model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0, stream=True
    ) as raw:
        assert raw.headers["content-type"].startswith("text/event-stream")
        assert raw.headers[REPLICA]
        chunks = list(raw.parse())
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reference
    assert chunks[-1].choices[0].finish_reason == "length"


def test_errors_keep_the_openai_shape(ray_server: ServerProcess) -> None:
    bad = httpx.post(
        f"{ray_server.base_url}/v1/chat/completions",
        json={"model": MODEL, "messages": []},
        timeout=30,
    )
    assert bad.status_code == 400
    assert bad.json()["error"]["param"] == "messages"
    assert bad.headers[REPLICA]
    missing = httpx.get(f"{ray_server.base_url}/v1/nope", timeout=30)
    assert missing.status_code == 404
    assert missing.json()["error"]["type"] == "not_found_error"
    health = httpx.get(f"{ray_server.base_url}/health", timeout=30)
    assert health.status_code == 200 and health.json()["status"] == "ok"


def _generated(port: int) -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith("octomil_generation_tokens_total{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_each_replica_exports_its_own_metrics(client: openai.OpenAI, metrics_port: int) -> None:
    ports = (metrics_port, metrics_port + 1)
    before = [_generated(p) for p in ports]
    served: dict[str, int] = {}

    def ask(n: int) -> None:
        raw = client.completions.with_raw_response.create(
            model=MODEL, prompt="Count: one, two,", max_tokens=3 + n, temperature=0
        )
        tokens = raw.parse().usage.completion_tokens
        served[raw.headers[REPLICA]] = served.get(raw.headers[REPLICA], 0) + tokens

    with ThreadPoolExecutor(6) as pool:
        list(pool.map(ask, range(6)))
    gained = sorted(_generated(p) - b for p, b in zip(ports, before))
    # Each replica's own counter moved by exactly the tokens of the responses it signed.
    assert gained == sorted([*map(float, served.values()), *[0.0] * (2 - len(served))])


def test_killed_replica_is_replaced_and_no_request_is_lost(
    ray_server: ServerProcess, reference: str, metrics_port: int
) -> None:
    """Ray's router sends a request not yet taken by a replica to a live one; a request the
    killed replica had taken fails with a 5xx (OpenAI-shaped by the proxy middleware), which
    the SDK retries (max_retries=2, its default): every SDK call still returns the answer."""
    failures: list[tuple[int, dict]] = []

    def hook(response: httpx.Response) -> None:
        if response.status_code >= 500:
            response.read()
            failures.append((response.status_code, response.json()))

    http = httpx.Client(event_hooks={"response": [hook]}, timeout=120)
    sdk = openai.OpenAI(
        base_url=f"{ray_server.base_url}/v1", api_key="none", http_client=http, max_retries=2
    )
    before = set(replica_pids(ray_server))
    ids_before = {
        httpx.get(f"{ray_server.base_url}/health", timeout=30).headers[REPLICA] for _ in range(8)
    }

    def ask(_: int) -> str:
        out = sdk.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=40, temperature=0
        )
        return (out.choices[0].message.content or "")[: len(reference)]

    def running(port: int) -> float:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        line = next(x for x in text.splitlines() if x.startswith("octomil_requests_running{"))
        return float(line.rsplit(" ", 1)[1])

    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(ask, i) for i in range(6)]
        # Kill only once both replicas run requests: the victim surely has accepted work.
        deadline = time.monotonic() + 60
        while not all(running(p) > 0 for p in (metrics_port, metrics_port + 1)):
            assert time.monotonic() < deadline, "the requests never reached both replicas"
            time.sleep(0.05)
        victim = sorted(before)[0]
        os.kill(victim, signal.SIGKILL)
        answers = [f.result() for f in futures]
    assert answers == [reference] * 6
    assert failures, "the killed replica had requests in flight, which must have failed over"
    for status, body in failures:
        assert status == 500 and body["error"]["code"] == "proxy_error"

    deadline = time.monotonic() + 120
    while len(set(replica_pids(ray_server)) - {victim}) < 2:
        assert time.monotonic() < deadline, "the killed replica was not replaced"
        time.sleep(0.5)
    ray_server.ray_pids |= descendants(ray_server.proc.pid)  # type: ignore[attr-defined]
    seen: set[str] = set()
    while len(seen - ids_before) == 0:
        assert time.monotonic() < deadline, "the new replica never answered"
        seen.add(httpx.get(f"{ray_server.base_url}/health", timeout=30).headers[REPLICA])
    # The replacement took over the victim's rank, hence its metrics port.
    for port in (metrics_port, metrics_port + 1):
        assert httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).status_code == 200


def test_sigterm_stops_ray_without_stray_processes(ray_server: ServerProcess) -> None:
    pids = ray_server.ray_pids | descendants(ray_server.proc.pid)  # type: ignore[attr-defined]
    assert any("raylet" in cmdline(p) for p in pids)
    ray_server.proc.send_signal(signal.SIGTERM)
    assert ray_server.proc.wait(timeout=90) == 0
    deadline = time.monotonic() + 30
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert [cmdline(p) for p in pids if alive(p)] == []
    assert "[serve] Stopping" in ray_server.output()


def test_replica_flags_are_checked_before_ray_starts() -> None:
    out = subprocess.run(
        octomil_cmd("serve", "--ray", "--replicas", "3", "--max-replicas", "2"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert out.stderr.strip() == (
        "error: --replicas 3 must lie within --min-replicas 1 and --max-replicas 2"
    )
