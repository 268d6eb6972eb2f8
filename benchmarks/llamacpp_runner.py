"""llama.cpp (llama-cpp-python) configuration of the performance report, driven by report.py.

Runs in the benchmark-only environment ``.bench-env/`` (it needs only the standard library and
``llama_cpp``), with the same line protocol as ``report_worker.py``: JSON requests on stdin,
JSON replies on stdout. Greedy (temp 0 -> llama.cpp's greedy sampler), no repetition penalty,
and ``Llama.generate`` never stops on EOS, so every request yields exactly ``max_tokens`` tokens.
Token ids come from Octomil's tokenizer, so all configurations see identical prompts.

  .bench-env/bin/python benchmarks/llamacpp_runner.py MODEL.gguf [--threads N] [--no-extra-buffers]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from importlib.metadata import version
from pathlib import Path

from proc_memory import process_rss

memory = process_rss


def set_extra_buffers(enabled: bool) -> None:
    """Whether llama.cpp may put weights in its extra CPU buffer types (AMX, repacked layouts).

    ``Llama`` exposes no argument for it, so the default model parameters are wrapped.
    """
    import llama_cpp.llama_cpp as api

    default = api.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = enabled
        return p

    api.llama_model_default_params = params


def generate(llm, ids: list[int], max_tokens: int, max_seconds: float | None) -> dict:
    """Greedy tokens with timings; stops early (``truncated``) once ``max_seconds`` have passed.

    The cap only guards the run time: with other processes on the cores, llama.cpp's threads
    can stall for seconds per token in their spinning barriers.
    """
    llm.reset()  # no KV-cache prefix reuse between requests
    start = time.perf_counter()
    stamps, tokens = [], []
    gen = llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0)
    truncated = False
    for token in gen:
        stamps.append(time.perf_counter())
        tokens.append(int(token))
        if len(tokens) == max_tokens:
            break
        if max_seconds is not None and len(tokens) >= 2 and stamps[-1] - start > max_seconds:
            truncated = True
            break
    gen.close()
    return {
        "tokens": tokens,
        "ttft_s": stamps[0] - start,
        "decode_s": stamps[-1] - stamps[0],
        "avg_layers": None,
        "exited": 0,
        "truncated": truncated,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-ctx", type=int, default=4096)
    ap.add_argument("--max-seconds", type=float, help="stop a generation after this long")
    ap.add_argument(
        "--no-extra-buffers",
        action="store_true",
        help="keep weights out of llama.cpp's extra buffer types (AMX / repack), see report.py",
    )
    args = ap.parse_args()

    proto = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # llama.cpp's own logging must not reach the protocol stream
    sys.stdout = sys.stderr

    start = time.perf_counter()
    set_extra_buffers(not args.no_extra_buffers)
    from llama_cpp import Llama

    llm = Llama(
        model_path=str(args.model),
        n_ctx=args.n_ctx,
        n_batch=512,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        verbose=False,
    )
    info = {
        "description": f"llama-cpp-python {version('llama_cpp_python')}, {args.threads} threads, "
        "greedy, same GGUF file",
        "llama_cpp_python": version("llama_cpp_python"),
        "source": str(args.model),
        "file_bytes": args.model.stat().st_size,
        "threads": args.threads,
        "extra_buffers": not args.no_extra_buffers,
        "load_s": time.perf_counter() - start,
        "after_load": memory(),
    }
    try:
        Path("/proc/self/clear_refs").write_text("5")  # peak RSS from here on
        info["peak_reset"] = True
    except OSError:
        info["peak_reset"] = False
    proto.write(json.dumps({"ready": True, "info": info}) + "\n")
    proto.flush()

    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "quit":
            break
        if req["op"] == "generate":
            reply = generate(llm, req["ids"], req["max_tokens"], args.max_seconds) | memory()
        else:
            reply = {"error": f"unknown op {req['op']!r}"}
        proto.write(json.dumps(reply) + "\n")
        proto.flush()


if __name__ == "__main__":
    main()
