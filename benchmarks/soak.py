"""A bounded soak of a real ``octomil serve``: mixed clients for a few minutes, nothing lost.

Starts the server (embedded model, balanced preset, shadow checks at 0.1 on the raw head so exits,
catch-up rows and shadow rows all run) and drives it for ``--duration`` seconds with ``--clients``
threads, each picking at random (seeded): a chat completion, a streamed chat completion, a stream it
abandons after two chunks (a disconnect), a text completion, or a bad request that must get a 4xx.
Every 5 s it samples the server's resident memory and its KV-cache gauge. At the end: requests by
kind and status, errors by kind, lost requests (an exception or a missing ``[DONE]`` on a stream
that was read to the end), 5xx count, RSS and KV over time. Writes ``benchmarks/results/soak.json``.

Flat memory is judged by a rule fixed before the run: the first ``--warmup-fraction`` (half) of
the run is warm-up, when MLX's buffer cache and malloc's arenas grow to the largest shapes the mix
produces (``benchmarks/leak_probe.py`` shows that rise stops); over the rest a least-squares line
is fitted to RSS, and memory is flat when that line rises by less than 1% of the RSS at the start
of the judged window. The same fit is reported for MLX's active and cache memory (``/metrics``),
so a rise can be placed. A PNG of memory over time is written next to the JSON.

Run: ``nice -n 10 .venv/bin/python benchmarks/soak.py --duration 1200 --clients 4`` (bounded).
"""

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

MODEL = "smollm2-135m"
PROMPTS = ["Name three fruits.", "What is rain?", "Tell me about the moon.", "Why is grass green?"]
BAD = [
    (b'{"model": "smollm2-135m", "messages": [', "malformed_json"),
    (json.dumps({"model": MODEL, "messages": [], "max_tokens": 4}).encode(), "empty_messages"),
    (
        json.dumps({"model": "nope", "messages": [{"role": "user", "content": "x"}]}).encode(),
        "model",
    ),
    (json.dumps({"model": MODEL, "prompt": "x", "wat": 1}).encode(), "unknown_field"),
]


def wait_healthy(base: str, tries: int = 720) -> bool:
    """Poll ``/health`` every 0.25 s (at most ``tries`` times); whether it answered 200."""
    for _ in range(tries):
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


GAUGES = {
    "kv_tokens": "octomil_kv_cache_tokens{",
    "mlx_active_mb": "octomil_mlx_active_memory_bytes{",
    "mlx_cache_mb": "octomil_mlx_cache_memory_bytes{",
    "mlx_peak_mb": "octomil_mlx_peak_memory_bytes{",  # RSS follows this high-water mark
}
FLAT_RISE = 0.01  # of the RSS at the start of the judged window


def gauges(base: str) -> dict[str, float]:
    """The KV-cache gauge (tokens) and MLX's memory gauges (MB) from ``/metrics``."""
    found = {k: -1.0 for k in GAUGES}
    for line in httpx.get(f"{base}/metrics", timeout=10).text.splitlines():
        for key, prefix in GAUGES.items():
            if line.startswith(prefix):
                value = float(line.rsplit(" ", 1)[1])
                found[key] = value if key == "kv_tokens" else round(value / 2**20, 1)
    return found


def fit(ts: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares line through (ts, ys): (slope per second, intercept)."""
    n = len(ts)
    mt, my = sum(ts) / n, sum(ys) / n
    var = sum((t - mt) ** 2 for t in ts)
    slope = sum((t - mt) * (y - my) for t, y in zip(ts, ys, strict=True)) / var if var else 0.0
    return slope, my - slope * mt


def judge(samples: list[dict], warmup_s: float) -> dict:
    """The flatness verdict over the samples after ``warmup_s`` (see the module docstring)."""
    window = [s for s in samples if s["t_s"] >= warmup_s]
    if len(window) < 3:
        return {"verdict": "too few samples after warm-up"}
    ts = [s["t_s"] for s in window]
    out: dict = {"warmup_s": warmup_s, "judged_samples": len(window)}
    for key in ("rss_mb", "mlx_active_mb", "mlx_cache_mb"):
        slope, intercept = fit(ts, [s[key] for s in window])
        out[key] = {
            "at_start": window[0][key],
            "at_end": window[-1][key],
            "min_max": [min(s[key] for s in window), max(s[key] for s in window)],
            "fitted_rise_mb": round(slope * (ts[-1] - ts[0]), 2),
            "slope_mb_per_h": round(slope * 3600, 2),
            "line": [round(intercept, 3), round(slope, 7)],
        }
    done = [s["requests_done"] for s in window]
    if done[-1] > done[0]:
        rise = out["rss_mb"]["fitted_rise_mb"]
        out["rss_mb"]["fitted_rise_kb_per_request"] = round(1024 * rise / (done[-1] - done[0]), 2)
    limit = FLAT_RISE * window[0]["rss_mb"]
    out["rule"] = (
        f"RSS least-squares rise over t >= {warmup_s:g} s below {FLAT_RISE:.0%} of the RSS at "
        f"its start ({limit:.1f} MB)"
    )
    out["flat"] = out["rss_mb"]["fitted_rise_mb"] < limit
    return out


def plot(samples: list[dict], verdict: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ts = [s["t_s"] / 60 for s in samples]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for key, label in (
        ("rss_mb", "RSS"),
        ("mlx_active_mb", "MLX active"),
        ("mlx_cache_mb", "MLX cache"),
    ):
        ax.plot(ts, [s[key] for s in samples], label=label)
        if key in verdict:
            intercept, slope = verdict[key]["line"]
            judged = [s["t_s"] for s in samples if s["t_s"] >= verdict["warmup_s"]]
            ax.plot(
                [t / 60 for t in judged],
                [intercept + slope * t for t in judged],
                "k--",
                linewidth=0.8,
            )
    if "warmup_s" in verdict:
        ax.axvline(verdict["warmup_s"] / 60, color="grey", linestyle=":", label="end of warm-up")
    ax.set_xlabel("minutes")
    ax.set_ylabel("MB")
    ax.set_title(f"octomil serve soak: memory ({'flat' if verdict.get('flat') else 'NOT flat'})")
    ax.legend(loc="center right")
    ax2 = ax.twinx()
    ax2.plot(ts, [s["requests_done"] for s in samples], color="tab:grey", alpha=0.4)
    ax2.set_ylabel("requests done (grey)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def one(client: httpx.Client, rng: random.Random, stats: Counter, errors: Counter) -> None:
    kind = rng.choices(["chat", "stream", "disconnect", "completion", "bad"], [4, 3, 1, 1, 1])[0]
    prompt = rng.choice(PROMPTS)
    body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": 16}
    try:
        if kind == "chat" or kind == "completion":
            path = "/v1/chat/completions"
            if kind == "completion":
                path, body = "/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 16}
            r = client.post(path, json=body)
            stats[f"{kind} {r.status_code}"] += 1
            if r.status_code >= 500:
                errors[f"{kind} {r.status_code}: {r.text[:80]}"] += 1
        elif kind in ("stream", "disconnect"):
            with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
                lines = []
                for ln in r.iter_lines():
                    if ln.startswith("data:"):
                        lines.append(ln)
                    if kind == "disconnect" and len(lines) == 2:
                        break  # leaving the block closes the connection mid-stream
                stats[f"{kind} {r.status_code}"] += 1
                if kind == "stream" and (not lines or lines[-1] != "data: [DONE]"):
                    errors["stream without [DONE]"] += 1
                if any('"error"' in ln for ln in lines):
                    errors["stream error event"] += 1
        else:
            content, why = rng.choice(BAD)
            r = client.post(
                "/v1/chat/completions" if why != "unknown_field" else "/v1/completions",
                content=content,
                headers={"Content-Type": "application/json"},
            )
            stats[f"bad {r.status_code}"] += 1
            if not 400 <= r.status_code < 500:
                errors[f"bad request {why} got {r.status_code}"] += 1
    except httpx.HTTPError as exc:
        errors[f"{kind}: {type(exc).__name__}"] += 1


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=float, default=180.0)
    ap.add_argument("--clients", type=int, default=6)
    ap.add_argument("--warmup-fraction", type=float, default=0.5)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "soak.json"))
    args = ap.parse_args()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = open("/tmp/octomil-soak.log", "wb")  # noqa: SIM115 - closed at the end
    server = subprocess.Popen(
        [sys.executable, "-m", "octomil.cli", "serve", "--port", str(port)]
        + ["--exit-policy", "lens", "--speed-quality", "balanced", "--shadow-rate", "0.1"]
        + ["--max-concurrency", "16", "--log-level", "warning"],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        wait_healthy(base)
        stats: Counter = Counter()
        errors: Counter = Counter()
        stop = time.monotonic() + args.duration
        lock = threading.Lock()

        def worker(seed: int) -> None:
            rng = random.Random(seed)
            with httpx.Client(base_url=base, timeout=120) as client:
                while time.monotonic() < stop:
                    s, e = Counter(), Counter()
                    one(client, rng, s, e)
                    with lock:
                        stats.update(s)
                        errors.update(e)

        samples = []
        threads = [threading.Thread(target=worker, args=(k,)) for k in range(args.clients)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            with lock:
                done = sum(stats.values()) + sum(errors.values())
            samples.append(
                {
                    "t_s": round(time.monotonic() - t0, 1),
                    "requests_done": done,
                    "rss_mb": round(rss_bytes(server.pid) / 2**20, 1),
                    **gauges(base),
                }
            )
            time.sleep(5)
        for t in threads:
            t.join()
        time.sleep(1)
        after = {"rss_mb": round(rss_bytes(server.pid) / 2**20, 1), **gauges(base)}
        health = httpx.get(f"{base}/health", timeout=10).json()
        server.terminate()
        exit_code = server.wait(timeout=60)
    finally:
        if server.poll() is None:
            server.kill()
        log.close()
    served = sum(v for k, v in stats.items() if k.split()[-1] == "200")
    rss = [s["rss_mb"] for s in samples]
    verdict = judge(samples, args.warmup_fraction * args.duration)
    result = {
        "command": " ".join(["benchmarks/soak.py", *sys.argv[1:]]),
        "duration_s": args.duration,
        "clients": args.clients,
        "note": "machine shared with other engineers' tests and benchmarks",
        "load_average_at_end": list(os.getloadavg()),
        "MALLOC_ARENA_MAX": os.environ.get("MALLOC_ARENA_MAX"),  # glibc's default when None
        "memory_flat": verdict,
        "requests_by_kind_and_status": dict(sorted(stats.items())),
        "requests_served_200": served,
        "errors": dict(errors),
        "http_5xx": sum(v for k, v in stats.items() if k.split()[-1].startswith("5")),
        "rss_mb_first_last_max": [rss[0], rss[-1], max(rss)] if rss else None,
        "after_idle": after,
        "health_after": health,
        "server_exit_code_on_sigterm": exit_code,
        "samples": samples,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    plot(samples, verdict, Path(args.out).with_suffix(".png"))
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=2))


if __name__ == "__main__":
    main()
