"""Serving benchmark: many HTTP clients at once against Octomil, llama.cpp's and mlx-lm's servers.

Each configuration (``serve_servers.py``) runs as its own server process on 127.0.0.1, one at a
time, and meets closed-loop load (``serve_load.py``) at each concurrency level in turn: N async
httpx clients streaming greedy chat completions of at most ``--max-tokens`` tokens, bounded by a
request count and a time per level. Prompts are the held-out chat prompts
(``prompts/eval_prompts.jsonl``) with every ``--long-every``-th request a long one (~500, ~1000,
~1500 tokens, built from the benchmark prompt files); each request's text starts with its own
number, so no server can answer from a prompt cache. Each server is warmed up before every level.

Writes ``results/serve.json`` (per configuration and level: aggregate output tok/s, TTFT and
inter-token latency p50/p95/p99, requests/s, errors, average layers per token; machine facts,
versions, exact commands) and ``serve.png``; ``serve_render.py`` turns the JSON into the tables of
REPORT.md and the README. The full run (6 configurations x 4 levels, <= 90 s a level plus
startups and warm-ups) takes ~45 min; run it on a quiet machine:

    make bench-serve                               # = .venv/bin/python benchmarks/serve_bench.py
    .venv/bin/python benchmarks/serve_bench.py --quick   # smoke: octomil, 1 and 4 clients -> /tmp
    .venv/bin/python benchmarks/serve_bench.py --config octomil --config llama.cpp --levels 1,16
    .venv/bin/python benchmarks/serve_render.py          # tables + PNG from results/serve.json
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_env import BENCH_ENV, ensure_llama_server, ensure_llamacpp
from serve_load import Prompt, run_level, warm_up
from serve_render import DEFAULT_REPORT, plot, render_table, section, write_section
from serve_servers import (
    MODEL_NAME,
    Paths,
    Server,
    ServerConfig,
    command,
    free_port,
    parse_config,
    versions,
)

from octomil.calibrate.prompts import eval_prompts_path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_OUT = HERE / "results" / "serve.json"
SHORT_PROMPTS = eval_prompts_path()
LONG_SOURCES = (SHORT_PROMPTS, HERE / "prompts" / "engine_prompts.jsonl")
LONG_TOKENS = (500, 1000, 1500)
CHARS_PER_TOKEN = 3.6  # SmolLM2's tokenizer on these lists (measured: ~3.6, template aside)
MLX_DIR = BENCH_ENV / "models" / "smollm2-135m-fp32"

# Batching on/off and early exit on/off for Octomil (flags of the continuous-batching server),
# and the two anchors. The lead's final run uses exactly these.
DEFAULT_CONFIGS = (
    "octomil",
    "octomil-no-batch=octomil:--max-batch-size 1",
    "octomil-exit=octomil:--speed-quality balanced",
    "llama.cpp",
    # One thread as well: with other processes on the cores, llama.cpp's two threads can stall
    # for seconds in their spinning barriers (report.py measures both for the same reason).
    "llama.cpp-1t=llama.cpp:-t 1 -tb 1",
    "mlx-lm",
)
QUICK_CONFIGS = ("octomil",)


# --- prompts -------------------------------------------------------------------------------------


def _texts(path: Path) -> list[str]:
    return [json.loads(line)["prompt"] for line in path.read_text().splitlines() if line.strip()]


def long_text(target_tokens: int) -> str:
    """A ~``target_tokens`` request: a list of the benchmark prompts, answer only the last."""
    texts = [t for p in LONG_SOURCES for t in _texts(p)]
    head = "Here is a list of requests. Answer only the last one.\n\n"
    lines: list[str] = []
    while len(head) + sum(len(t) + 1 for t in lines) < target_tokens * CHARS_PER_TOKEN:
        lines.append(texts[len(lines) % len(texts)])
    return head + "\n".join(lines)


def request_prompts(n: int, long_every: int, long_tokens: tuple[int, ...]) -> list[Prompt]:
    """The level's request sequence: held-out chat prompts, every ``long_every``-th one long.

    Each text starts with its request number, so prompts never repeat within a level.
    """
    short = _texts(SHORT_PROMPTS)
    longs = [long_text(t) for t in long_tokens]
    out: list[Prompt] = []
    n_short = n_long = 0
    for i in range(n):
        if long_every and i % long_every == long_every - 1 and longs:
            kind, text = "long", longs[n_long % len(longs)]
            n_long += 1
        else:
            kind, text = "short", short[n_short % len(short)]
            n_short += 1
        out.append(Prompt(kind, f"(Request {i + 1}.) {text}"))
    return out


# --- machine -------------------------------------------------------------------------------------


def cpu_facts() -> dict:
    model, flags = "?", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile")
    return {
        "cpu_model": model,
        "cpu_cores": os.cpu_count(),
        "isa": [f for f in wanted if f in flags],
    }


def git_commit() -> str | None:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
        return git("rev-parse", "HEAD") + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def load1() -> float:
    return round(os.getloadavg()[0], 2)


# --- one configuration ---------------------------------------------------------------------------


def prepare(configs: list[ServerConfig], args: argparse.Namespace) -> tuple[Paths, dict]:
    """Locate or build what the configurations need; the status of each optional piece."""
    from octomil.models.registry import embedded_file, resolve

    gguf = args.gguf or embedded_file(resolve(None))
    kinds = {c.kind for c in configs}
    status: dict = {}
    if "llama.cpp" in kinds:
        status["llama.cpp"] = ensure_llama_server(args.bench_env, may_build=not args.no_build)
    if "llama-cpp-python" in kinds:
        status["llama-cpp-python"] = ensure_llamacpp(args.bench_env, may_build=not args.no_build)
    mlx_dir = None
    if "mlx-lm" in kinds:
        export = [sys.executable, str(HERE / "mlx_model_dir.py"), str(gguf), str(args.mlx_dir)]
        done = subprocess.run(export, capture_output=True, text=True)
        ok = done.returncode == 0
        mlx_dir = args.mlx_dir if ok else None
        status["mlx-lm"] = {"available": ok, "model_dir": str(args.mlx_dir)} | (
            {} if ok else {"reason": "\n".join(done.stderr.strip().splitlines()[-3:])}
        )
    paths = Paths(Path(sys.executable), args.bench_env, Path(gguf), mlx_dir)
    return paths, status


def run_config(
    config: ServerConfig, paths: Paths, args: argparse.Namespace, log_dir: Path, status: dict
) -> dict:
    """All levels of one configuration; a failure is recorded, never raised."""
    row: dict = {"name": config.name, "kind": config.kind, "args": list(config.args), "levels": []}
    piece = status.get(config.kind, {"available": True})
    if not piece.get("available"):
        return row | {"available": False, "reason": piece.get("reason", "not available")}
    top = max(args.levels)
    server: Server | None = None
    launch: dict | None = None  # how the server of the next level was started, if it was
    try:
        for n in args.levels:
            if server is None or config.per_level:
                if server is not None:
                    server.stop()
                port = free_port()
                argv, env = command(config, paths, port, n, top, args.threads)
                log = log_dir / f"{config.name}-c{n}.log"
                print(f"[serve-bench] {config.name}: starting for {n} clients", flush=True)
                started = time.perf_counter()
                server = Server(argv, env, port, log)
                model = server.wait_ready(args.start_timeout, MODEL_NAME.get(config.kind))
                launch = {
                    "command": shlex.join(argv),
                    "env": env,
                    "startup_s": round(time.perf_counter() - started, 1),
                    "startup_lines": server.startup_lines(),
                }
                row |= {"available": True, "model": model}
            prompts = request_prompts(args.requests_for(n), args.long_every, args.long_tokens)
            warm_errors = asyncio.run(warm_up(server.base_url, model, prompts, n))
            load_before = load1()
            level = asyncio.run(
                run_level(
                    server.base_url, model, prompts, n, len(prompts), args.seconds, args.max_tokens
                )
            )
            level |= {"warmup_errors": warm_errors, "load_1m": [load_before, load1()]}
            level |= {"server": launch} if launch else {}
            launch = None
            row["levels"].append(level)
            print(
                f"[serve-bench] {config.name} c={n}: {level['output_tok_s']:.1f} tok/s, "
                f"{level['completed']} done, {level['cut']} cut, {level['errors']} errors, "
                f"ITL p95 {fmt_ms(level['itl_s']['p95'])}",
                flush=True,
            )
    except RuntimeError as exc:
        row |= {"available": bool(row["levels"]), "reason": str(exc)[-2000:]}
        print(f"[serve-bench] {config.name}: {str(exc).splitlines()[0]}", flush=True)
    finally:
        if server is not None:
            server.stop()
    return row


def fmt_ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1e3:.0f} ms"


# --- command line --------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = ap.add_argument
    add(
        "--config",
        action="append",
        help="NAME=KIND[:ARGS], repeatable (KIND: octomil, llama.cpp, llama-cpp-python, mlx-lm); "
        f"default: {'; '.join(DEFAULT_CONFIGS)}",
    )
    add("--levels", help="concurrency levels (default 1,4,16,64; 1,4 with --quick)")
    add("--requests", type=int, help="requests per level (default 4 x clients, at least 16)")
    add("--seconds", type=float, help="time per level, s (default 90; 20 with --quick)")
    add("--max-tokens", type=int, help="max_tokens of every request (default 128; 16 --quick)")
    add("--long-every", type=int, default=8, help="every k-th request is long (0: none)")
    add("--long-tokens", help="long prompt sizes in tokens (default 500,1000,1500)")
    add("--threads", type=int, default=os.cpu_count() or 2, help="llama.cpp threads")
    add("--start-timeout", type=float, default=300, help="longest wait for a server to be ready")
    add("--gguf", type=Path, help="model file (default: the embedded SmolLM2-135M GGUF)")
    add("--bench-env", type=Path, default=BENCH_ENV, help="llama.cpp builds (bench_env.py)")
    add("--mlx-dir", type=Path, default=MLX_DIR, help="stock mlx-lm model directory (made once)")
    add("--no-build", action="store_true", help="never build llama.cpp (skip what is missing)")
    add("--quick", action="store_true", help="smoke run: octomil only, tiny levels, -> /tmp")
    add("--out", type=Path, help=f"results JSON (default {DEFAULT_OUT.relative_to(ROOT)})")
    args = ap.parse_args(argv)
    q = args.quick
    args.configs = [
        parse_config(s) for s in (args.config or (QUICK_CONFIGS if q else DEFAULT_CONFIGS))
    ]
    args.levels = [int(x) for x in (args.levels or ("1,4" if q else "1,4,16,64")).split(",")]
    args.seconds = args.seconds or (20 if q else 90)
    args.max_tokens = args.max_tokens or (16 if q else 128)
    args.long_tokens = tuple(
        int(x) for x in (args.long_tokens or ("300" if q else "500,1000,1500")).split(",")
    )
    if q and args.long_every == 8:
        args.long_every = 3
    fixed = args.requests
    args.requests_for = lambda n: fixed or (n + 2 if q else max(16, 4 * n))
    if args.out is None:
        args.out = (
            Path(tempfile.gettempdir()) / "octomil-serve-quick" / "serve.json" if q else DEFAULT_OUT
        )
    args.no_build = args.no_build or q
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    log_dir = Path(tempfile.mkdtemp(prefix="octomil-serve-logs-"))
    print(f"[serve-bench] server logs in {log_dir}", flush=True)
    wall, load_start = time.perf_counter(), load1()
    paths, status = prepare(args.configs, args)
    rows = [run_config(c, paths, args, log_dir, status) for c in args.configs]
    result = {
        "smoke": args.quick,
        "settings": {
            "levels": args.levels,
            "requests_per_level": {str(n): args.requests_for(n) for n in args.levels},
            "seconds_per_level": args.seconds,
            "max_tokens": args.max_tokens,
            "long_every": args.long_every,
            "long_tokens": list(args.long_tokens),
            "temperature": 0.0,
            "threads": args.threads,
            "prompts": str(SHORT_PROMPTS.relative_to(ROOT)),
        },
        "machine": cpu_facts()
        | {
            "load_average_1m": [load_start, load1()],
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "command": shlex.join(["benchmarks/serve_bench.py", *(argv or sys.argv[1:])]),
            "git_commit": git_commit(),
            "wall_s": round(time.perf_counter() - wall, 1),
            "gguf": str(paths.gguf),
        },
        "versions": versions(paths),
        "prepared": status,
        "configs": rows,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    png = args.out.with_suffix(".png")
    plot(result, png)
    print(render_table(result))
    if args.out == DEFAULT_OUT:  # the real run: its section of REPORT.md too
        write_section(DEFAULT_REPORT, section(result, os.path.relpath(png, DEFAULT_REPORT.parent)))
    print(f"[serve-bench] wrote {args.out} and {args.out.with_suffix('.png').name}", flush=True)


if __name__ == "__main__":
    main()
