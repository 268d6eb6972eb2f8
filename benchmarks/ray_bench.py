"""Aggregate decode throughput: plain ``octomil serve`` vs Ray Serve with 1 and 2 replicas.

Same run, same load for each: ``--requests`` chat completions (greedy, ``--max-tokens`` each)
from ``--concurrency`` client threads; aggregate tok/s = completion tokens / wall time. Each
configuration gets the whole machine: one replica reserves every core (``--replica-cpus``
= cores, so Ray gives it that many BLAS threads), two replicas half each. Also records resident
memory per replica process and of Ray's own processes, for the Kubernetes resource requests.

    python benchmarks/ray_bench.py [--requests 24 --concurrency 8 --max-tokens 48]

Bounded: three server starts (~30-90 s each on a busy 2-core machine) and ``--requests``
requests per configuration. Writes benchmarks/results/ray.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

RESULTS = Path(__file__).parent / "results" / "ray.json"
MODEL = "smollm2-135m"
PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle stays upright.",
    "List some facts about the moon.",
    "Describe a walk through a forest in autumn.",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def name(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    first = raw[0].decode(errors="replace")
    return first if first.startswith("ray::") else Path(first).name


def start(args: list[str], port: int) -> tuple[subprocess.Popen, Path]:
    log = Path(tempfile.mkstemp(prefix="octomil-ray-bench-", suffix=".log")[1])
    cmd = [sys.executable, "-m", "octomil.cli", "serve", "--port", str(port), *args]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited {proc.returncode}: {log.read_text()[-2000:]}")
        if b"[serve] Listening" in log.read_bytes():
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                    return proc, log
            except httpx.HTTPError:
                pass
        time.sleep(0.5)
    stop(proc)
    raise RuntimeError("server did not start in 300 s")


def stop(proc: subprocess.Popen) -> None:
    pids = descendants(proc.pid)
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
    for pid in pids:  # nothing of Ray may stay behind on the shared cores
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def load(port: int, requests: int, concurrency: int, max_tokens: int) -> dict:
    url = f"http://127.0.0.1:{port}/v1/chat/completions"

    def one(i: int) -> tuple[int, str]:
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
            "max_tokens": max_tokens,
            "temperature": 0,
        }
        r = httpx.post(url, json=body, timeout=600)
        r.raise_for_status()
        return r.json()["usage"]["completion_tokens"], r.headers.get("x-octomil-replica", "")

    with ThreadPoolExecutor(concurrency) as pool:  # warm-up: one request per client
        list(pool.map(one, range(concurrency)))
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        out = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - t0
    tokens = sum(t for t, _ in out)
    per_replica: dict[str, int] = {}
    for _, replica in out:
        per_replica[replica] = per_replica.get(replica, 0) + 1
    return {
        "wall_s": round(wall, 2),
        "completion_tokens": tokens,
        "aggregate_tok_s": round(tokens / wall, 2),
        "requests_per_replica": sorted(per_replica.values(), reverse=True),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=48)
    a = parser.parse_args()
    cores = os.cpu_count() or 1
    configs = {
        "plain": [],
        "ray_1_replica": ["--ray", "--replicas", "1", "--replica-cpus", str(cores)],
        "ray_2_replicas": ["--ray", "--replicas", "2", "--replica-cpus", str(cores / 2)],
    }
    results: dict[str, dict] = {}
    for label, args in configs.items():
        port = free_port()
        print(f"[ray-bench] {label}: starting", flush=True)
        t0 = time.perf_counter()
        proc, log = start(args, port)
        startup = time.perf_counter() - t0
        try:
            measured = load(port, a.requests, a.concurrency, a.max_tokens)
            procs = {pid: name(pid) for pid in descendants(proc.pid) | {proc.pid}}
            main_rss = rss_mib(proc.pid)
            memory = {
                f"{n} ({pid})": round(m, 1)
                for pid, n in sorted(procs.items())
                if (m := rss_mib(pid)) is not None
            }
        finally:
            stop(proc)
        replicas = [m for k, m in memory.items() if "ServeReplica" in k] or [main_rss]
        results[label] = {
            **measured,
            "startup_s": round(startup, 1),
            "rss_mib": memory,
            "replica_rss_mib": replicas,
            "total_rss_mib": round(sum(memory.values()), 1),
        }
        print(f"[ray-bench] {label}: {json.dumps(results[label])}", flush=True)
        log.unlink(missing_ok=True)
    one, two = results["ray_1_replica"], results["ray_2_replicas"]
    report = {
        "benchmark": "ray_bench",
        "machine": {"cpus": cores, "platform": platform.platform(), "shared": True},
        "load": vars(a),
        "results": results,
        "ratio_2_vs_1_replica": round(two["aggregate_tok_s"] / one["aggregate_tok_s"], 3),
        "ratio_ray_1_vs_plain": round(
            one["aggregate_tok_s"] / results["plain"]["aggregate_tok_s"], 3
        ),
    }
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("ratio_2_vs_1_replica", "ratio_ray_1_vs_plain")}))


if __name__ == "__main__":
    main()
