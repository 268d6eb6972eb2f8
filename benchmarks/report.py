"""Performance report: Octomil against stock mlx-lm and llama.cpp, one machine, one run.

Configurations (greedy, fixed output length, EOS ignored everywhere, same prompt token ids):
Octomil full depth and each early-exit preset (``Engine.load()``); stock mlx-lm modules and
``generate_step`` on the same GGUF weights dequantized to fp32 (as Octomil serves them) and on the
native 4-bit weights (slow: fewer prompts); llama.cpp through llama-cpp-python on the same GGUF
file, 2 threads, from the benchmark-only environment ``.bench-env/`` (``bench_env.py``), built once
(from source, ~12 min) and then reused.

Every configuration runs in its own process (``report_worker.py``, ``llamacpp_runner.py``), so
its peak memory is its own; all stay loaded and receive each prompt in turn (round-robin, start
rotated per prompt, one process working at a time), after one warm-up each, so machine noise hits
all alike. Also measured in the same run: memory bandwidth (numpy), the weight bytes each
configuration reads per token (-> its bandwidth ceiling), long-prompt prefill, and a
micro-benchmark of one token's matrix-vector products in MLX vs numpy/OpenBLAS that says which
part of the gap to llama.cpp belongs to MLX's CPU backend.

Writes ``benchmarks/results/report.json``, the PNG plots beside it and ``benchmarks/REPORT.md``
(rendered from the JSON only). Re-run exactly (~20 min on 2 cores; run it on a quiet machine):

    make bench-report                                   # = .venv/bin/python benchmarks/report.py
    .venv/bin/python benchmarks/report.py --quick       # smoke: 2 prompts, 16 tokens -> /tmp
    .venv/bin/python benchmarks/report.py --render-only # REPORT.md + PNGs from the JSON
"""

from __future__ import annotations

import octomil  # first: loads OpenBLAS before anything imports mlx

# isort: split
import argparse
import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import version
from pathlib import Path
from statistics import median

import numpy as np
from bench_env import BENCH_ENV, ensure_llamacpp, env_python
from engine_bench import DEFAULT_PROMPTS, cpu_model, first_divergence, git_commit
from layer_shapes import projection_shapes
from report_render import (
    CONFIGS,
    FULL,
    LABELS,
    LLAMA,
    LLAMA1,
    LLAMAS,
    MB,
    PRESETS,
    Q4,
    ROUTED,
    STOCK,
    print_headline,
    render,
)

from octomil.calibrate.prompts import eval_prompts_path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
DEFAULT_OUT = RESULTS / "report.json"
DEFAULT_MD = HERE / "REPORT.md"
LONG_PROMPT_SOURCES = (eval_prompts_path(), DEFAULT_PROMPTS)
# llama.cpp on both cores, as a user would run it; and on one, which stays fast when other
# processes share the cores (its threads wait for each other in spinning barriers).
LLAMACPP_THREADS = {LLAMA: 2, LLAMA1: 1}
# A healthy llama.cpp generation here takes 1-5 s; a stalled one (see above) is cut off after this.
LLAMACPP_MAX_SECONDS = 30

# Prefill is the same full-depth pass for every preset, and 4-bit MLX prefill is very slow.
LONG_PREFILL_CONFIGS = (FULL, STOCK, ROUTED, *LLAMAS)
# Stock mlx-lm as the BRIEF defines it (OpenBLAS, fp32), without Octomil's one-row route.
UNROUTED_CONFIGS = (STOCK, Q4)


# --- pure helpers (unit-tested) ------------------------------------------------------------------


def bytes_per_token(
    layer_bytes: float, head_bytes: float, avg_layers: float | None, total_layers: int
) -> float:
    """Weight bytes one decode step reads: the layers it runs plus the head.

    Early exit scales the layer part by the share of layers used; the extra head/probe reads of
    exit checks are not counted, so for presets this is a lower bound (the ceiling an upper one).
    """
    share = 1.0 if avg_layers is None else avg_layers / total_layers
    return layer_bytes * share + head_bytes


def agreement(tokens: list[int], reference: list[int]) -> dict:
    """Per-position agreement, matched prefix share and exact match against ``reference``."""
    n = len(reference)
    same = sum(a == b for a, b in zip(tokens, reference, strict=False))
    return {
        "position": same / n if n else 0.0,
        "prefix": first_divergence(tokens, reference) / n if n else 0.0,
        "exact": tokens == reference,
    }


def pooled_rate(tokens: list[int], seconds: list[float]) -> float | None:
    """Total tokens over total seconds (long and short runs weigh by their length)."""
    total = sum(seconds)
    return sum(tokens) / total if total > 0 else None


# --- worker processes ----------------------------------------------------------------------------


class WorkerError(RuntimeError):
    pass


class Worker:
    """A configuration in its own process, spoken to in JSON lines."""

    def __init__(
        self, name: str, argv: list[str], log_dir: Path, env: dict[str, str] | None = None
    ) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            cwd=ROOT,
            env=env,
        )
        self.info = self._read()["info"]

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            tail = "".join(self.log_path.read_text().splitlines(keepends=True)[-15:])
            raise WorkerError(f"{self.name} exited ({self.proc.returncode}); log tail:\n{tail}")
        reply = json.loads(line)
        if "error" in reply:
            raise WorkerError(f"{self.name}: {reply['error']}")
        return reply

    def request(self, **req: object) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write('{"op": "quit"}\n')
                self.proc.stdin.flush()
                self.proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
        self._log.close()


def start_llamacpp(config: str, python: Path, gguf: str, log_dir: Path, plain: bool) -> Worker:
    """llama.cpp with its extra weight buffers (AMX / repack) if a first decode survives them.

    On CPUs that advertise AMX inside some VMs, llama.cpp's AMX buffer crashes the process at
    the first decode; then it runs again without extra buffers (the report says so). ``plain``:
    go without them from the start.
    """
    threads = str(LLAMACPP_THREADS[config])
    argv = [str(python), str(HERE / "llamacpp_runner.py"), gguf, "--threads", threads]
    argv += ["--max-seconds", str(LLAMACPP_MAX_SECONDS)]
    if not plain:
        worker = Worker(config, argv, log_dir)
        try:
            worker.request(op="generate", ids=[1, 2, 3, 4], max_tokens=2)
            return worker
        except WorkerError as exc:
            worker.close()
            print(f"[report] llama.cpp crashed with extra buffers ({exc}); again without")
    worker = Worker(config, [*argv, "--no-extra-buffers"], log_dir)
    worker.info["extra_buffers_crashed"] = not plain
    return worker


def start_worker(
    config: str,
    gguf: str | None,
    log_dir: Path,
    llama_python: Path | None,
    exit_policy: str | None,
    plain_llamacpp: bool = False,
) -> Worker:
    print(f"[report] loading {config}", flush=True)
    if config in LLAMAS:
        assert llama_python is not None and gguf is not None
        return start_llamacpp(config, llama_python, gguf, log_dir, plain_llamacpp)
    argv = [sys.executable, str(HERE / "report_worker.py"), config]
    if gguf is not None and config in (STOCK, ROUTED, Q4):
        argv += ["--gguf", gguf]
    if exit_policy is not None and config in (FULL, *PRESETS):
        argv += ["--exit-policy", exit_policy]
    env = os.environ | {"OCTOMIL_NO_BLAS_ROUTE": "1"} if config in UNROUTED_CONFIGS else None
    return Worker(config, argv, log_dir, env)


# --- machine measurements (numpy, in this process, while every worker idles) ---------------------


def _best_s(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def measure_bandwidth(mb: int = 512, repeats: int = 5) -> dict:
    """Memory bandwidth in GB/s, best of ``repeats``: streaming reads and a copy.

    Decoding streams the weights once per token, so the read figure (the best of one and two
    threads) is the one the ceilings use. ``copy`` counts read + write bytes.
    """
    n = mb * 2**20 // 4
    a = np.ones(n, dtype=np.float32)
    b = np.empty_like(a)
    halves = [a[: n // 2], a[n // 2 :]]
    with ThreadPoolExecutor(2) as pool:  # numpy releases the GIL inside the reduction
        two = _best_s(lambda: list(pool.map(np.sum, halves)), repeats)
    out = {
        "array_mb": mb,
        "read_1_thread_gb_s": a.nbytes / _best_s(a.sum, repeats) / 1e9,
        "read_2_threads_gb_s": a.nbytes / two / 1e9,
        "copy_gb_s": 2 * a.nbytes / _best_s(lambda: np.copyto(b, a), repeats) / 1e9,
    }
    out["read_gb_s"] = max(out["read_1_thread_gb_s"], out["read_2_threads_gb_s"])
    return out


def numpy_micro(dims: dict, layers: int, repeats: int) -> dict:
    """One token's fp32 products through ``layers`` distinct random layers + head, in numpy."""
    rng = np.random.default_rng(0)
    shapes = projection_shapes(dims)
    ws = [
        rng.standard_normal((o, i), dtype=np.float32) for _ in range(layers) for _, o, i in shapes
    ]
    ws.append(rng.standard_normal((dims["vocab_size"], dims["hidden_size"]), dtype=np.float32))
    xs = {w.shape[1]: rng.standard_normal(w.shape[1], dtype=np.float32) for w in ws}
    wts = [np.ascontiguousarray(w.T) for w in ws]
    out = {"layers": layers, "flops_per_token": sum(2 * w.size for w in ws), "variants": {}}
    for name, mats, product in (
        ("fp32 (out, in)", ws, lambda w: w @ xs[w.shape[1]]),
        ("fp32 (in, out)", wts, lambda w: xs[w.shape[0]] @ w),
    ):
        per_shape = {
            label: _best_s(lambda w=w, p=product: [p(w) for _ in range(20)], repeats) / 20 * 1000
            for (label, _, _), w in zip(shapes, mats, strict=False)
        }
        per_shape["head"] = _best_s(lambda p=product, h=mats[-1]: p(h), repeats) * 1000
        out["variants"][name] = {
            "per_call_ms": _best_s(lambda m=mats, p=product: [p(w) for w in m], repeats) * 1000,
            "per_shape_ms": per_shape,
            "weight_bytes": sum(w.nbytes for w in ws),
        }
    return out


def numpy_micro_threads(dims: dict, layers: int, repeats: int, threads: tuple[int, ...]) -> dict:
    """:func:`numpy_micro` in a fresh process per OpenBLAS thread count (fixed at its start).

    One thread shows what a plain BLAS matvec reaches when another process holds a core.
    """
    merged: dict = {"variants": {}}
    for n in threads:
        code = (
            f"import json, sys; sys.path.insert(0, {str(HERE)!r}); import report; "
            f"print(json.dumps(report.numpy_micro({dims!r}, {layers}, {repeats})))"
        )
        env = os.environ | {"OPENBLAS_NUM_THREADS": str(n), "OMP_NUM_THREADS": str(n)}
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
        )
        one = json.loads(done.stdout.strip().splitlines()[-1])
        merged |= {k: v for k, v in one.items() if k != "variants"}
        label = f"{n} thread" + ("s" if n > 1 else "")
        merged["variants"] |= {f"{k}, {label}": v for k, v in one["variants"].items()}
    return merged


# --- other processes on the cores ----------------------------------------------------------------


def busy_cores(seconds: float = 1.0) -> float | None:
    """Cores kept busy over ``seconds`` by all processes (/proc/stat); None where unavailable.

    Called while every worker idles, so it measures the other processes on the machine.
    """

    def sample() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        return sum(fields) - fields[3] - fields[4], sum(fields)  # minus idle and iowait

    try:
        busy0, total0 = sample()
        time.sleep(seconds)
        busy1, total1 = sample()
    except (OSError, ValueError):
        return None
    return (busy1 - busy0) / (total1 - total0) * (os.cpu_count() or 1) if total1 > total0 else 0.0


class QuietGate:
    """Before each round: wait (bounded) until other processes leave the cores, and record it."""

    def __init__(self, threshold: float, max_wait_s: float, budget_s: float) -> None:
        self.threshold, self.max_wait_s, self.budget_s = threshold, max_wait_s, budget_s
        self.records: list[dict] = []
        self.spent = 0.0

    def wait(self, label: str) -> None:
        start = time.perf_counter()
        first = busy = busy_cores()
        while (
            busy is not None
            and busy > self.threshold
            and time.perf_counter() - start < self.max_wait_s
            and self.spent + time.perf_counter() - start < self.budget_s
        ):
            time.sleep(4)
            busy = busy_cores()
        waited = time.perf_counter() - start
        self.spent += waited
        if first is not None and first > self.threshold:
            print(
                f"[report] {label}: other processes used {first:.1f} cores; waited {waited:.0f} s"
            )
        self.records.append(
            {"round": label, "busy_cores_first": first, "busy_cores": busy, "waited_s": waited}
        )


# --- the run -------------------------------------------------------------------------------------


def load_prompts(path: Path, n: int | None) -> list[dict]:
    prompts = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if n is not None and n < len(prompts):  # spread over the file's categories
        step = len(prompts) / n
        prompts = [prompts[int(i * step)] for i in range(n)]
    return prompts


def long_prompt_ids(encoder: Worker, target: int) -> list[int]:
    """A chat prompt of at least ``target`` tokens, built from the benchmark prompt files."""
    texts = [
        json.loads(line)["prompt"]
        for p in LONG_PROMPT_SOURCES
        for line in p.read_text().splitlines()
        if line
    ]
    head = "Here is a list of requests. Answer only the last one.\n\n"
    ids: list[int] = []
    k = 0
    while len(ids) < target:
        k += 1
        body = "\n".join(texts[i % len(texts)] for i in range(k))
        ids = encoder.request(op="encode", text=head + body)["ids"]
    return ids


def q4_indices(n_prompts: int, k: int) -> set[int]:
    """Which prompts the slow 4-bit configuration runs: ``k`` spread over the set."""
    k = max(0, min(k, n_prompts))
    return {int(i * n_prompts / k) for i in range(k)} if k else set()


def run_all(args: argparse.Namespace, llama: dict, log_dir: Path, gate: QuietGate) -> dict:
    prompts = load_prompts(args.prompts, 2 if args.quick else args.num_prompts)
    configs = [
        c
        for c in CONFIGS
        if not (c == Q4 and args.skip_4bit) and not (c in LLAMAS and not llama["available"])
    ]
    llama_python = env_python(args.bench_env) if llama["available"] else None

    workers: dict[str, Worker] = {}
    loads = [os.getloadavg()[0]]
    try:
        # One at a time: each loads (and measures its weight layout) while the others idle.
        workers[FULL] = start_worker(FULL, None, log_dir, llama_python, args.exit_policy)
        gguf = workers[FULL].info["source"]
        for c in configs[1:]:
            plain = any(w.info.get("extra_buffers_crashed") for w in workers.values())
            workers[c] = start_worker(c, gguf, log_dir, llama_python, args.exit_policy, plain)
        encoded = [workers[FULL].request(op="encode", text=p["prompt"])["ids"] for p in prompts]
        long_ids = long_prompt_ids(workers[FULL], args.long_prompt_tokens)
        q4_set = q4_indices(len(prompts), 1 if args.quick else args.q4_prompts)

        print("[report] warm-up", flush=True)
        for c in configs:
            workers[c].request(op="generate", ids=encoded[0], max_tokens=8)

        runs = []
        what = f"{len(prompts)} prompts x {len(configs)} configs, {args.max_tokens} tokens"
        print(f"[report] timed: {what}", flush=True)
        for i, ids in enumerate(encoded):
            gate.wait(f"prompt {i + 1}")
            k = i % len(configs)
            for c in configs[k:] + configs[:k]:
                if c == Q4 and i not in q4_set:
                    continue
                r = workers[c].request(op="generate", ids=ids, max_tokens=args.max_tokens)
                runs.append(
                    r
                    | {"config": c, "prompt_index": i, "prompt_tokens": len(ids), "kind": "decode"}
                )
                n = len(r["tokens"])
                rate = (n - 1) / r["decode_s"] if r["decode_s"] > 0 else 0.0
                ttft = r["ttft_s"] * 1000
                where = f"[{i + 1}/{len(prompts)}] {c:<17}"
                print(f"  {where} {n:3d} tok {rate:7.2f} tok/s  ttft {ttft:7.1f} ms", flush=True)
            loads.append(os.getloadavg()[0])

        print(
            f"[report] long-prompt prefill: {len(long_ids)} tokens x {args.long_prompt_reps}",
            flush=True,
        )
        long_configs = [c for c in LONG_PREFILL_CONFIGS if c in workers]
        for rep in range(args.long_prompt_reps):
            gate.wait(f"long prompt {rep + 1}")
            k = rep % len(long_configs)
            for c in long_configs[k:] + long_configs[:k]:
                r = workers[c].request(op="generate", ids=long_ids, max_tokens=1)
                runs.append(
                    r
                    | {
                        "config": c,
                        "prompt_index": -1,
                        "prompt_tokens": len(long_ids),
                        "kind": "prefill",
                    }
                )
                print(f"  {c:<17} prefill {len(long_ids) / r['ttft_s']:8.1f} tok/s", flush=True)
        infos = {c: w.info for c, w in workers.items()}
    finally:
        for w in workers.values():
            w.close()

    dims = {
        k: infos[FULL][k]
        for k in (
            "hidden_size",
            "intermediate_size",
            "num_attention_heads",
            "num_key_value_heads",
            "vocab_size",
        )
    }
    layers = infos[FULL]["total_layers"]
    rounds = 3 if args.quick else 7
    print("[report] micro-benchmark: one token's matrix-vector products, MLX vs numpy", flush=True)

    def mlx_micro(label: str, name: str, env: dict[str, str] | None = None, **request) -> dict:
        gate.wait(label)
        argv = [sys.executable, str(HERE / "report_worker.py"), "mlx-micro"]
        worker = Worker(name, argv, log_dir, env)
        try:
            return worker.request(op="micro", dims=dims, layers=layers, rounds=rounds, **request)
        finally:
            worker.close()

    mlx_routed = mlx_micro("micro-benchmark", "mlx-micro")
    # The same fp32 products with Octomil's few-row route off: MLX's own sgemm dispatch.
    no_route = os.environ | {"OCTOMIL_NO_BLAS_ROUTE": "1"}
    mlx_sgemm = mlx_micro(
        "micro-benchmark without the BLAS route", "mlx-micro-sgemm", no_route, fp32_only=True
    )
    gate.wait("numpy micro-benchmark")
    numpy_part = numpy_micro_threads(dims, layers, rounds, threads=(2, 1))
    micro = {"dims": dims, "mlx": mlx_routed, "mlx-sgemm": mlx_sgemm, "numpy": numpy_part}
    loads.append(os.getloadavg()[0])
    return {
        "prompts": prompts,
        "prompt_tokens": [len(ids) for ids in encoded],
        "long_prompt_tokens": len(long_ids),
        "q4_prompt_indices": sorted(q4_set),
        "configs": configs,
        "infos": infos,
        "runs": runs,
        "micro": micro,
        "load_average_1m": [round(x, 2) for x in loads],
        "quiet": gate.records,
    }


# --- summary -------------------------------------------------------------------------------------


def summarize(data: dict, bandwidth_gb_s: float) -> dict:
    runs, infos = data["runs"], data["infos"]
    reference = {
        r["prompt_index"]: r["tokens"]
        for r in runs
        if r["config"] == FULL and r["kind"] == "decode"
    }
    out = {}
    for c in data["configs"]:
        rs = [r for r in runs if r["config"] == c and r["kind"] == "decode"]
        long = [r for r in runs if r["config"] == c and r["kind"] == "prefill"]
        info = infos[c]
        # a generation cut off early (llama.cpp stalls) is compared on the tokens it produced
        agree = [
            agreement(r["tokens"], reference[r["prompt_index"]][: len(r["tokens"])]) for r in rs
        ]
        avg_layers = (
            None
            if c in LLAMAS
            else sum(r["avg_layers"] * len(r["tokens"]) for r in rs)
            / sum(len(r["tokens"]) for r in rs)
        )
        if c in LLAMAS:
            bpt = float(info["file_bytes"])
        else:
            bpt = bytes_per_token(
                info["layer_bytes"], info["head_bytes"], avg_layers, info["total_layers"]
            )
        # median over prompts: robust to a generation that another process stalled
        decode = median((len(r["tokens"]) - 1) / r["decode_s"] for r in rs if r["decode_s"] > 0)
        pooled = pooled_rate([len(r["tokens"]) - 1 for r in rs], [r["decode_s"] for r in rs])
        ceiling = bandwidth_gb_s * 1e9 / bpt
        peaks = [r.get("mlx_peak_bytes") for r in rs + long if r.get("mlx_peak_bytes") is not None]
        out[c] = {
            "label": LABELS[c],
            "prompts": len(rs),
            "completion_tokens": sum(len(r["tokens"]) for r in rs),
            "truncated_runs": sum(bool(r.get("truncated")) for r in rs),
            "decode_tok_s": decode,
            "decode_tok_s_pooled": pooled,
            "ms_per_token": 1000 / decode if decode else None,
            # median over prompts: one stalled first token should not stand for the whole set
            "prefill_tok_s": median(r["prompt_tokens"] / r["ttft_s"] for r in rs),
            "ttft_ms": 1000 * median(r["ttft_s"] for r in rs),
            "ttft_ms_mean": 1000 * sum(r["ttft_s"] for r in rs) / len(rs),
            "long_prefill_tok_s": median(r["prompt_tokens"] / r["ttft_s"] for r in long)
            if long
            else None,
            "long_ttft_ms": 1000 * median(r["ttft_s"] for r in long) if long else None,
            "avg_layers_used": avg_layers,
            "early_exit_share": sum(r["exited"] for r in rs) / sum(len(r["tokens"]) for r in rs),
            "position_agreement": sum(a["position"] for a in agree) / len(agree),
            "prefix_agreement": sum(a["prefix"] for a in agree) / len(agree),
            "exact_match": sum(a["exact"] for a in agree) / len(agree),
            "rss_after_load_mb": info["after_load"]["rss_bytes"] / MB,
            "rss_peak_mb": max(r["rss_peak_bytes"] for r in rs + long) / MB,
            "mlx_peak_mb": max(peaks) / MB if peaks else None,
            "bytes_per_token_mb": bpt / MB,
            "ceiling_tok_s": ceiling,
            "share_of_ceiling": decode / ceiling if decode else None,
            "load_s": info["load_s"],
        }
    for row in out.values():
        for base, key in ((FULL, "vs_full"), (STOCK, "vs_mlx_lm")):
            if base in out:
                row[f"decode_{key}"] = row["decode_tok_s"] / out[base]["decode_tok_s"]
                row[f"prefill_{key}"] = row["prefill_tok_s"] / out[base]["prefill_tok_s"]
                lp, blp = row["long_prefill_tok_s"], out[base]["long_prefill_tok_s"]
                row[f"long_prefill_{key}"] = lp / blp if lp and blp else None
    return out


def micro_summary(micro: dict, bandwidth_gb_s: float) -> dict:
    """Milliseconds per token of the products alone, GFLOP/s and GB/s, per backend/variant."""
    rows = {}
    for backend in ("mlx", "mlx-sgemm", "numpy"):
        if backend not in micro:  # reports made before the BLAS route
            continue
        m = micro[backend]
        for variant, v in m["variants"].items():
            for how in ("per_call_ms", "one_graph_ms"):
                if how not in v:
                    continue
                ms = v[how]
                name = f"{backend} {variant}" + (", one graph" if how == "one_graph_ms" else "")
                rows[name] = {
                    "ms_per_token": ms,
                    "gflop_s": m["flops_per_token"] / ms / 1e6,
                    "gb_s": v["weight_bytes"] / ms / 1e6,
                    "weight_mb": v["weight_bytes"] / MB,
                    "bandwidth_floor_ms": v["weight_bytes"] / bandwidth_gb_s / 1e6,
                    "per_shape_ms": v["per_shape_ms"],
                }
    return rows


def gap_analysis(summary: dict, micro: dict, bandwidth_gb_s: float) -> dict | None:
    """Split Octomil's ms/token against llama.cpp's into bandwidth, matvec and other parts."""
    if FULL not in summary:
        return None
    full = summary[FULL]
    mlx_fp32 = min(
        (v for k, v in micro.items() if k.startswith("mlx fp32") and k.endswith("one graph")),
        key=lambda v: v["ms_per_token"],
    )
    numpy_name = min(
        (k for k in micro if k.startswith("numpy")), key=lambda k: micro[k]["ms_per_token"]
    )
    numpy_fp32 = micro[numpy_name]
    q4 = micro.get("mlx 4-bit quantized, one graph")
    gap = {
        "octomil_ms": full["ms_per_token"],
        "fp32_bytes_mb": full["bytes_per_token_mb"],
        "fp32_floor_ms": full["bytes_per_token_mb"] * MB / bandwidth_gb_s / 1e6,
        "mlx_matvec_ms": mlx_fp32["ms_per_token"],
        "mlx_matvec_gb_s": mlx_fp32["gb_s"],
        "numpy_matvec_ms": numpy_fp32["ms_per_token"],
        "numpy_matvec_gb_s": numpy_fp32["gb_s"],
        "numpy_matvec_variant": numpy_name,
        "mlx_q4_matvec_ms": q4["ms_per_token"] if q4 else None,
        "other_ms": full["ms_per_token"] - mlx_fp32["ms_per_token"],
    }
    llamas = [c for c in LLAMAS if c in summary]
    if llamas:  # the faster llama.cpp configuration of this run
        best = max(llamas, key=lambda c: summary[c]["decode_tok_s"])
        ll = summary[best]
        gap |= {
            "llamacpp_config": best,
            "llamacpp_ms": ll["ms_per_token"],
            "llamacpp_speedup": full["ms_per_token"] / ll["ms_per_token"],
            "q4_bytes_mb": ll["bytes_per_token_mb"],
            "q4_floor_ms": ll["bytes_per_token_mb"] * MB / bandwidth_gb_s / 1e6,
            "bytes_ratio": full["bytes_per_token_mb"] / ll["bytes_per_token_mb"],
        }
    return gap


# --- main ----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = ap.add_argument
    add(
        "--quick",
        action="store_true",
        help="smoke run: 2 prompts, 16 tokens, llama.cpp only if cached, "
        "writes to a temporary directory unless --out is given",
    )
    add("--max-tokens", type=int, help="new tokens per generation (default 128; 16 with --quick)")
    add("--prompts", type=Path, default=DEFAULT_PROMPTS, help="JSONL of {prompt, category}")
    add("--num-prompts", type=int, help="use this many prompts, spread over the file (default all)")
    add("--q4-prompts", type=int, default=4, help="prompts for the slow stock 4-bit configuration")
    add("--skip-4bit", action="store_true", help="leave out stock mlx-lm on the 4-bit weights")
    add("--skip-llamacpp", action="store_true", help="leave out llama.cpp (the report says so)")
    add(
        "--long-prompt-tokens",
        type=int,
        help="long-prompt prefill size (default 512; 128 with --quick)",
    )
    add("--long-prompt-reps", type=int, default=2, help="long-prompt prefill repetitions")
    add(
        "--exit-policy",
        help="passed to Engine.load (a policy directory, lens, none); default: the engine's",
    )
    add("--quiet-threshold", type=float, default=0.5, help="cores others may use before a round")
    add("--quiet-wait", type=float, default=90, help="longest wait (s) for quiet before a round")
    add("--quiet-budget", type=float, default=600, help="total wait (s) for quiet (0 with --quick)")
    add(
        "--bench-env", type=Path, default=BENCH_ENV, help="benchmark-only venv for llama-cpp-python"
    )
    add(
        "--out",
        type=Path,
        help=f"results JSON (default {DEFAULT_OUT.relative_to(ROOT)}); PNGs beside it",
    )
    add(
        "--markdown",
        type=Path,
        help=f"report (default {DEFAULT_MD.relative_to(ROOT)}, or beside --out)",
    )
    add(
        "--render-only", action="store_true", help="only re-render the markdown and PNGs from --out"
    )
    args = ap.parse_args(argv)
    if args.max_tokens is None:
        args.max_tokens = 16 if args.quick else 128
    if args.long_prompt_tokens is None:
        args.long_prompt_tokens = 128 if args.quick else 512
    if args.out is None:
        args.out = (
            Path(tempfile.gettempdir()) / "octomil-report-quick" / "report.json"
            if args.quick
            else DEFAULT_OUT
        )
    if args.markdown is None:
        args.markdown = DEFAULT_MD if args.out == DEFAULT_OUT else args.out.with_name("REPORT.md")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.render_only:
        render(json.loads(args.out.read_text()), args.out, args.markdown)
        print(f"[report] rendered {args.markdown}")
        return
    wall_start, load_at_start = time.perf_counter(), os.getloadavg()[0]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    log_dir = Path(tempfile.mkdtemp(prefix="octomil-report-logs-"))
    print(f"[report] worker logs in {log_dir}", flush=True)

    if args.skip_llamacpp:
        llama = {"available": False, "reason": "skipped with --skip-llamacpp"}
    else:
        llama = ensure_llamacpp(args.bench_env, may_build=not args.quick)
    print(f"[report] llama.cpp: {llama.get('version') or llama['reason']}", flush=True)

    print("[report] memory bandwidth", flush=True)
    gate = QuietGate(args.quiet_threshold, args.quiet_wait, 0 if args.quick else args.quiet_budget)
    gate.wait("bandwidth before")
    bw_before = measure_bandwidth()
    data = run_all(args, llama, log_dir, gate)
    gate.wait("bandwidth after")
    bw_after = measure_bandwidth()
    bandwidth = {k: max(bw_before[k], bw_after[k]) for k in bw_before} | {
        "before": bw_before,
        "after": bw_after,
    }

    summary = summarize(data, bandwidth["read_gb_s"])
    micro = micro_summary(data["micro"], bandwidth["read_gb_s"])
    full_info = data["infos"][FULL]
    gguf = Path(full_info["source"])
    result = {
        "machine": {
            "cpu_model": cpu_model(),
            "cpu_cores": os.cpu_count(),
            "python": platform.python_version(),
            "mlx": version("mlx"),
            "mlx_lm": version("mlx-lm"),
            "numpy": np.__version__,
            "octomil": octomil.__version__,
            "blas": full_info["blas"],
            "engine_selection": full_info["description"],
            "model": full_info["model_id"],
            "total_layers": full_info["total_layers"],
            "gguf": str(gguf),
            "gguf_bytes": gguf.stat().st_size,
            "load_average_1m": [round(load_at_start, 2), *data["load_average_1m"]],
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "git_commit": git_commit(),
        },
        "settings": {
            "command": shlex.join(
                [
                    ".venv/bin/python",
                    "benchmarks/report.py",
                    *(argv if argv is not None else sys.argv[1:]),
                ]
            ),
            "max_tokens": args.max_tokens,
            "quick": args.quick,
            "prompts_file": os.path.relpath(args.prompts.resolve(), ROOT),
            "prompts": len(data["prompts"]),
            "prompt_tokens": data["prompt_tokens"],
            "q4_prompt_indices": data["q4_prompt_indices"],
            "long_prompt_tokens": data["long_prompt_tokens"],
            "long_prompt_reps": args.long_prompt_reps,
            "llamacpp_max_seconds": LLAMACPP_MAX_SECONDS,
            "quiet_gate": {
                "threshold_cores": args.quiet_threshold,
                "max_wait_s": args.quiet_wait,
                "budget_s": 0 if args.quick else args.quiet_budget,
            },
            "sampling": "greedy, EOS ignored, same token ids for every configuration",
            "configs": data["configs"],
        },
        "llamacpp": llama,
        "bandwidth": bandwidth,
        "summary": summary,
        "gap": gap_analysis(summary, micro, bandwidth["read_gb_s"]),
        "micro_summary": micro,
        "micro": data["micro"],
        "infos": data["infos"],
        "quiet": data["quiet"],
        "prompts": data["prompts"],
        "runs": data["runs"],
        "wall_time_s": round(time.perf_counter() - wall_start, 1),
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    render(result, args.out, args.markdown)
    print_headline(result)
    print(
        f"[report] wrote {args.out}, {args.markdown} and the PNGs in {result['wall_time_s']:.0f} s"
    )


if __name__ == "__main__":
    main()
