"""Compact weights benchmark: decode speed and quality of ``--dtype float32|q8|q4``, with llama.cpp
on the same GGUF, in one run (issue 14).

Per format, on the embedded model (full depth, greedy, no early exit):

- decode tok/s: single stream, from the first generated token to the last over (n - 1), pooled
  over prompts (``benchmarks/prompts/engine_prompts.jsonl``); configurations interleaved per
  prompt, rotated, each warmed up once, so machine noise hits all alike;
- prefill tok/s: one forward pass over the perplexity text (the dequantize-and-sgemm path);
- greedy agreement with float32: teacher-forced (each format's argmax at every position of the
  float32 greedy answer) and free-running exact match per prompt;
- perplexity of a fixed text (the history section of Python's license,
  ``benchmarks/prompts/perplexity_text.txt``); teacher forcing and perplexity feed 16 positions at
  a time through the KV cache, so every product takes the kernel decoding uses (int8 activations
  on x86 with the int8 kernels), not the prefill path;
- bytes of weights read per token (every parameter once: the tied head is the whole embedding),
  a two-thread read bandwidth measured in the same run, and the ceiling bandwidth / bytes.

llama.cpp (llama-cpp-python in ``.bench-env``, ``llamacpp_runner.py``, 2 threads, same GGUF, same
prompt token ids, exactly ``max_tokens`` tokens) runs interleaved with the others when installed.

    .venv/bin/python benchmarks/compact_bench.py            # ~3-5 min: results/compact.json + .png
"""

from __future__ import annotations

import octomil  # noqa: F401  (first: OpenBLAS and the BLAS route load before mlx)

# isort: split
import argparse
import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from engine_bench import FULL, cpu_model, git_commit, load_prompts, run_octomil
from mlx.utils import tree_flatten
from mlx_lm.models.cache import make_prompt_cache

from octomil import blas
from octomil.engine.engine import Engine
from octomil.quant import kernel

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_OUT = HERE / "results" / "compact.json"
FORMATS = ("float32", "q8", "q4")
LLAMA = "llama.cpp"


def weight_bytes(model) -> int:
    """Bytes of parameters a full-depth decode step reads (the tied head reads the embedding)."""
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def interleaved_best(fns: dict, rounds: int) -> dict:
    """Seconds of each ``fns`` value (a call), best of ``rounds``: each called once untimed, then
    all in turn every round, so machine noise hits them alike."""
    best = {key: float("inf") for key in fns}
    for fn in fns.values():
        fn()
    for _ in range(rounds):
        for key, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[key] = min(best[key], time.perf_counter() - start)
    return best


def read_bandwidth_gbs(mbytes: int = 512, repeats: int = 5) -> float:
    """Best of ``repeats`` two-thread sums over an array larger than the caches (GB/s)."""
    data = np.ones(mbytes * 2**20 // 8, dtype=np.float64)
    halves = np.array_split(data, 2)
    best = float("inf")
    for _ in range(repeats):
        threads = [threading.Thread(target=np.sum, args=(h,)) for h in halves]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        best = min(best, time.perf_counter() - start)
    return data.nbytes / best / 1e9


class LlamaCpp:
    """llama.cpp driven through ``llamacpp_runner.py`` (JSON lines)."""

    def __init__(self, gguf: str, max_seconds: float, env: Path) -> None:
        python = env / "bin" / "python"
        cmd = [str(python), str(HERE / "llamacpp_runner.py"), gguf, "--threads", "2"]
        cmd += ["--max-seconds", str(max_seconds)]
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        self.info = self._read()["info"]

    def _read(self) -> dict:
        assert self.proc.stdout is not None
        return json.loads(self.proc.stdout.readline())

    def generate(self, ids: list[int], max_tokens: int) -> dict:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": "generate", "ids": ids, "max_tokens": max_tokens}))
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def llamacpp_available(env: Path) -> bool:
    python = env / "bin" / "python"
    if not python.exists():
        return False
    done = subprocess.run([str(python), "-c", "import llama_cpp"], capture_output=True)
    return done.returncode == 0


# Quality is measured through the products decoding uses: chunks of this many positions (through
# the KV cache) keep every product within the few-row kernel (int8 activations on x86), where one
# forward pass over the whole text would take the prefill path (fp32 activations, sgemm).
QUALITY_CHUNK = 16


def forward_logits(engine: Engine, ids: list[int]) -> mx.array:
    """Logits of every position of ``ids``, fed ``QUALITY_CHUNK`` positions at a time."""
    model = engine.loaded.model
    cache = make_prompt_cache(model)
    pieces = []
    for start in range(0, len(ids), QUALITY_CHUNK):
        pieces.append(model(mx.array(ids[start : start + QUALITY_CHUNK])[None], cache=cache)[0])
        mx.eval(pieces[-1])
    return mx.concatenate(pieces, axis=0)


def prefill_tok_s(engine: Engine, ids: list[int]) -> float:
    """Prompt tokens a second of one forward pass over ``ids`` (the prefill path)."""
    start = time.perf_counter()
    mx.eval(engine.loaded.model(mx.array(ids)[None]))
    return len(ids) / (time.perf_counter() - start)


def perplexity(engine: Engine, ids: list[int]) -> float:
    logits = forward_logits(engine, ids).astype(mx.float32)
    logp = logits[:-1] - mx.logsumexp(logits[:-1], axis=-1, keepdims=True)
    nll = -mx.take_along_axis(logp, mx.array(ids[1:])[:, None], axis=-1).mean().item()
    return math.exp(nll)


def teacher_forced_agreement(engine: Engine, ids: list[int], answer: list[int]) -> tuple[int, int]:
    """Positions of the float32 ``answer`` where this format's argmax is the same token."""
    logits = forward_logits(engine, ids + answer[:-1])
    predicted = mx.argmax(logits[len(ids) - 1 :], axis=-1).tolist()
    return sum(int(p == a) for p, a in zip(predicted, answer, strict=False)), len(answer)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=6, help="first N prompts of the set")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--no-llamacpp", action="store_true")
    ap.add_argument("--bench-env", type=Path, default=ROOT / ".bench-env",
                    help="virtualenv with llama-cpp-python (benchmarks/bench_env.py)")  # fmt: skip
    args = ap.parse_args()
    load_before = os.getloadavg()[0]

    prompts = load_prompts(HERE / "prompts" / "engine_prompts.jsonl", quick=False)[: args.prompts]
    engines = {fmt: Engine.load(dtype=fmt, exit_policy="none") for fmt in FORMATS}
    tokenizer = engines["float32"].tokenizer
    encoded = [
        tokenizer.encode(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p["prompt"]}],
                add_generation_prompt=True,
                tokenize=False,
            )
        )
        for p in prompts
    ]
    llama = None
    if not args.no_llamacpp and llamacpp_available(args.bench_env):
        llama = LlamaCpp(engines["float32"].loaded.source, max_seconds=20, env=args.bench_env)
    configs = [*FORMATS, *([LLAMA] if llama else [])]

    def run(config: str, ids: list[int]) -> dict:
        if config == LLAMA:
            assert llama is not None
            r = llama.generate(ids, args.max_tokens)
            return {"tokens": r["tokens"], "decode_s": r["decode_s"]}
        r = run_octomil(engines[config], ids, FULL, args.max_tokens)
        return {"tokens": r.tokens, "decode_s": r.decode_s}

    for config in configs:  # warm-up
        run(config, encoded[0][:8])
    runs: dict[str, list[dict]] = {c: [] for c in configs}
    for i, ids in enumerate(encoded):
        for config in configs[i % len(configs) :] + configs[: i % len(configs)]:
            runs[config].append(run(config, ids))
        print(f"[compact] prompt {i + 1}/{len(encoded)} done", flush=True)

    text_ids = tokenizer.encode((HERE / "prompts" / "perplexity_text.txt").read_text())
    bandwidth = read_bandwidth_gbs()
    results: dict[str, dict] = {}
    reference = [r["tokens"] for r in runs["float32"]]
    for config in configs:
        tokens = sum(len(r["tokens"]) - 1 for r in runs[config])
        seconds = sum(r["decode_s"] for r in runs[config])
        entry: dict = {"decode_tok_s": tokens / seconds, "decoded_tokens": tokens}
        if config == LLAMA:
            entry["bytes_per_token"] = Path(engines["float32"].loaded.source).stat().st_size
        else:
            engine = engines[config]
            entry["bytes_per_token"] = weight_bytes(engine.loaded.model)
            entry["layout"] = engine.loaded.describe_layout()
            agree = [
                teacher_forced_agreement(engine, ids, ref)
                for ids, ref in zip(encoded, reference, strict=True)
            ]
            entry["teacher_forced_agreement"] = sum(a for a, _ in agree) / sum(n for _, n in agree)
            entry["free_running_exact_match"] = sum(
                r["tokens"] == ref for r, ref in zip(runs[config], reference, strict=True)
            ) / len(reference)
            entry["perplexity"] = perplexity(engine, text_ids)
            entry["prefill_tok_s"] = prefill_tok_s(engine, text_ids)
        entry["ceiling_tok_s"] = bandwidth * 1e9 / entry["bytes_per_token"]
        entry["share_of_ceiling"] = entry["decode_tok_s"] / entry["ceiling_tok_s"]
        results[config] = entry
    if llama:
        llama.close()
    base = results["float32"]["decode_tok_s"]
    for entry in results.values():
        entry["speedup_vs_float32"] = entry["decode_tok_s"] / base
        if LLAMA in results:
            entry["ratio_to_llamacpp"] = entry["decode_tok_s"] / results[LLAMA]["decode_tok_s"]

    out = {
        "benchmark": "compact weights (issue 14)",
        "commit": git_commit(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": {
            "cpu": cpu_model(),
            "note": "shared with other engineers' tests: noisy",
            "load_average_1m": {"start": load_before, "end": os.getloadavg()[0]},
        },
        "command": "python benchmarks/compact_bench.py " + " ".join(sys.argv[1:]),
        "blas": blas.describe(),
        "kernel": kernel.describe(),
        "prompts": len(encoded),
        "max_tokens": args.max_tokens,
        "perplexity_text_tokens": len(text_ids),
        "read_bandwidth_gbs": bandwidth,
        "llamacpp": llama.info["description"] if llama else "not installed (.bench-env)",
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    render(out, args.out.with_suffix(".png"))
    for config, e in results.items():
        extra = (
            f" ppl {e['perplexity']:.3f} agree {e['teacher_forced_agreement']:.1%}"
            if "perplexity" in e
            else ""
        )
        print(
            f"{config:9s} {e['decode_tok_s']:6.1f} tok/s"
            f"  {e['bytes_per_token'] / 1e6:6.1f} MB/token"
            f"  ceiling {e['ceiling_tok_s']:6.1f} ({e['share_of_ceiling']:.0%}){extra}"
        )


def render(out: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    results = out["results"]
    names = list(results)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    speeds = [results[n]["decode_tok_s"] for n in names]
    ceilings = [results[n]["ceiling_tok_s"] for n in names]
    xs = range(len(names))
    ax.bar(xs, ceilings, color="#dddddd", label="bandwidth ceiling")
    ax.bar(xs, speeds, color="#4477aa", label="measured decode")
    for x, n in zip(xs, names, strict=True):
        mb = results[n]["bytes_per_token"] / 1e6
        ax.text(x, speeds[x], f"{speeds[x]:.0f}\n{mb:.0f} MB/tok", ha="center", va="bottom")
    ax.set_xticks(list(xs), names)
    ax.set_ylabel("single-stream decode tok/s")
    ax.set_title(f"Compact weights, {out['machine']['cpu']} (shared machine)")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
