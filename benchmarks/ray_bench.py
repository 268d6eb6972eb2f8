"""Aggregate decode throughput: plain ``octomil serve`` vs Ray Serve with 1 and 2 replicas.

Same run, same load for each: ``--requests`` chat completions (greedy, ``--max-tokens`` each)
from ``--concurrency`` client threads; aggregate tok/s = completion tokens / wall time. Each
configuration gets the whole machine: one replica reserves every core (``--replica-cpus``
= cores, so Ray gives it that many BLAS threads), two replicas half each. Also records resident
memory per replica process and of Ray's own processes, for the Kubernetes resource requests.

    python benchmarks/ray_bench.py [--requests 16 --concurrency 8 --max-tokens 32 --rounds 2]

Bounded: 3 x ``--rounds`` server starts (~20-60 s each on a busy 2-core machine), each serving
``--requests`` requests after one warm-up request per client. Writes benchmarks/results/ray.json
(per run: tok/s, CPU seconds of the whole server process tree, the 1-minute load average at
the start, resident memory per process).
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


def cpu_seconds(pids: set[int]) -> float:
    """User + system CPU time of ``pids`` so far (a process that ended counts 0)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / tick


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


def load(
    proc: subprocess.Popen, port: int, requests: int, concurrency: int, max_tokens: int
) -> dict:
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
    pids = descendants(proc.pid) | {proc.pid}
    cpu0, t0 = cpu_seconds(pids), time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        out = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - t0
    cpu = cpu_seconds(pids) - cpu0
    tokens = sum(t for t, _ in out)
    per_replica: dict[str, int] = {}
    for _, replica in out:
        per_replica[replica] = per_replica.get(replica, 0) + 1
    return {
        "wall_s": round(wall, 2),
        "completion_tokens": tokens,
        "aggregate_tok_s": round(tokens / wall, 2),
        # CPU time of the whole server (Ray's processes included): on a shared machine the
        # wall-clock rate depends on the share of the cores the server got; these do not.
        "cpu_s": round(cpu, 2),
        "cores_used": round(cpu / wall, 2),
        "tok_per_cpu_s": round(tokens / cpu, 2),
        "requests_per_replica": sorted(per_replica.values(), reverse=True),
    }


def run_config(label: str, args: list[str], a: argparse.Namespace) -> dict:
    port = free_port()
    print(f"[ray-bench] {label}: starting", flush=True)
    t0 = time.perf_counter()
    proc, log = start(args, port)
    startup = time.perf_counter() - t0
    try:
        load_avg = os.getloadavg()[0]  # the other users of the shared cores, as we start
        measured = load(proc, port, a.requests, a.concurrency, a.max_tokens)
        procs = {pid: name(pid) for pid in descendants(proc.pid) | {proc.pid}}
        main_rss = rss_mib(proc.pid)
        memory = {
            f"{n} ({pid})": round(m, 1)
            for pid, n in sorted(procs.items())
            if (m := rss_mib(pid)) is not None
        }
    finally:
        stop(proc)
    log.unlink(missing_ok=True)
    run = {
        **measured,
        "load_average_1m": round(load_avg, 2),
        "startup_s": round(startup, 1),
        "rss_mib": memory,
        "replica_rss_mib": [m for k, m in memory.items() if "ServeReplica" in k] or [main_rss],
        "total_rss_mib": round(sum(memory.values()), 1),
    }
    print(f"[ray-bench] {label}: {json.dumps(run)}", flush=True)
    return run


def pooled(runs: list[dict]) -> dict:
    tokens = sum(r["completion_tokens"] for r in runs)
    wall = sum(r["wall_s"] for r in runs)
    cpu = sum(r["cpu_s"] for r in runs)
    return {
        "aggregate_tok_s": round(tokens / wall, 2),
        "tok_per_cpu_s": round(tokens / cpu, 2),
        "cores_used": round(cpu / wall, 2),
        "replica_rss_mib_max": max(x for r in runs for x in r["replica_rss_mib"]),
        "total_rss_mib_max": max(r["total_rss_mib"] for r in runs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument(
        "--rounds", type=int, default=2, help="runs per configuration, in mirrored order"
    )
    a = parser.parse_args()
    cores = os.cpu_count() or 1
    configs = {
        "plain": [],
        "ray_1_replica": ["--ray", "--replicas", "1", "--replica-cpus", str(cores)],
        "ray_2_replicas": ["--ray", "--replicas", "2", "--replica-cpus", str(cores / 2)],
    }
    # A B C C B A ...: slow drifts in the machine's other load weigh on every config alike.
    order = [
        label
        for r in range(a.rounds)
        for label in (list(configs) if r % 2 == 0 else list(reversed(configs)))
    ]
    runs: dict[str, list[dict]] = {label: [] for label in configs}
    for label in order:
        runs[label].append(run_config(label, configs[label], a))
    summary = {label: pooled(r) for label, r in runs.items()}
    one, two, plain = summary["ray_1_replica"], summary["ray_2_replicas"], summary["plain"]
    report = {
        "benchmark": "ray_bench",
        "machine": {"cpus": cores, "platform": platform.platform(), "shared": True},
        "load": vars(a),
        "order": order,
        "summary": summary,
        "ratio_2_vs_1_replica_tok_s": round(two["aggregate_tok_s"] / one["aggregate_tok_s"], 3),
        "ratio_2_vs_1_replica_tok_per_cpu_s": round(two["tok_per_cpu_s"] / one["tok_per_cpu_s"], 3),
        "ratio_ray_1_vs_plain_tok_s": round(one["aggregate_tok_s"] / plain["aggregate_tok_s"], 3),
        "runs": runs,
    }
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k.startswith("ratio")}))


if __name__ == "__main__":
    main()
