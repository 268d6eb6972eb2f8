"""One MLX configuration of the performance report, in its own process (driven by report.py).

Each configuration lives in a separate process so that its peak memory is its own; report.py
keeps all of them loaded and sends them the same prompts in turn (round-robin), one at a time,
so the processes never compete for the cores. Protocol: one JSON object per line, requests on
stdin, replies on the original stdout; everything else the libraries print goes to stderr.

    report_worker.py octomil-full|octomil-quality|octomil-balanced|octomil-fast [--exit-policy P]
    report_worker.py mlx-lm-fp32|mlx-lm-fp32-sgemv|mlx-lm-4bit --gguf PATH
    report_worker.py mlx-micro --dims JSON

Requests: {"op": "generate", "ids": [...], "max_tokens": N} -> tokens and timings;
{"op": "encode", "text": "..."} (Octomil workers) -> chat-templated ids; {"op": "micro"} (mlx-micro)
-> matrix-vector timings; {"op": "quit"}.
"""

from __future__ import annotations

import octomil  # first: loads OpenBLAS before anything imports mlx

# isort: split
import argparse
import json
import os
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from layer_shapes import projection_shapes
from mlx.utils import tree_flatten
from proc_memory import process_rss

from octomil import blas

OCTOMIL_PRESETS = {"octomil-full": None, "octomil-quality": "quality"}
OCTOMIL_PRESETS |= {"octomil-balanced": "balanced", "octomil-fast": "fast"}


# --- memory ------------------------------------------------------------------------------------


def memory() -> dict:
    """Process peak/current RSS (kernel) and MLX allocator peak/active (bytes)."""
    return process_rss() | {
        "mlx_peak_bytes": mx.get_peak_memory(),
        "mlx_active_bytes": mx.get_active_memory(),
    }


def reset_peaks() -> bool:
    """Start peak measurement afresh after loading (Linux: clear_refs 5 resets VmHWM)."""
    mx.reset_peak_memory()
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# --- weights read per token ----------------------------------------------------------------------


def nbytes(module: nn.Module) -> int:
    return sum(v.nbytes for _, v in tree_flatten(module.parameters()))


def weight_bytes(model: nn.Module) -> dict:
    """Bytes of the decoder layers and of the head (+ final norm) that one decode step reads.

    The embedding lookup reads one row; a tied head reads the whole embedding matrix.
    """
    inner = model.model
    head = model.lm_head if hasattr(model, "lm_head") else inner.embed_tokens
    return {
        "layer_bytes": sum(nbytes(layer) for layer in inner.layers),
        "head_bytes": nbytes(head) + nbytes(inner.norm),
        "total_layers": len(inner.layers),
        "parameter_bytes": nbytes(model),
    }


# --- configurations ------------------------------------------------------------------------------


class OctomilWorker:
    def __init__(self, config: str, exit_policy: str | None) -> None:
        from octomil.config import resolve_early_exit
        from octomil.engine.engine import Engine

        self.engine = Engine.load(exit_policy=exit_policy)
        self.settings = resolve_early_exit(OCTOMIL_PRESETS[config])
        policy = self.engine.policy_for(self.settings)
        loaded = self.engine.loaded
        self.info = weight_bytes(loaded.model) | {
            "description": self.engine.selection,
            "blas": blas.describe(),
            "layout": loaded.describe_layout(),
            "exit_policy": self.engine.exit_choice.status,
            "preset": OCTOMIL_PRESETS[config],
            "threshold": self.settings.threshold,
            "min_layers": getattr(policy, "min_layers", None),
            "exit_layers": list(getattr(policy, "exit_layers", []) or []),
            "source": loaded.source,
            "model_id": self.engine.model_id,
            "hidden_size": int(loaded.model.args.hidden_size),
            "intermediate_size": int(loaded.model.args.intermediate_size),
            "num_attention_heads": int(loaded.model.args.num_attention_heads),
            "num_key_value_heads": int(loaded.model.args.num_key_value_heads),
            "vocab_size": int(loaded.model.args.vocab_size),
        }

    def encode(self, text: str) -> list[int]:
        return self.engine.encode_chat([{"role": "user", "content": text}])

    def generate(self, ids: list[int], max_tokens: int) -> dict:
        from octomil.engine.types import GenerationRequest, SamplingParams

        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        gen = self.engine.generate(GenerationRequest(tuple(ids), params, self.settings))
        tokens = [event.token_id for event in gen]
        st = gen.stats
        return {
            "tokens": tokens,
            "ttft_s": st.time_to_first_token_s,
            "decode_s": st.decode_time_s,
            "avg_layers": st.avg_layers_used,
            "exited": st.early_exit_tokens,
            "engine_decode_tok_s": st.decode_tokens_per_s,
            "engine_prefill_tok_s": st.prefill_tokens_per_s,
        }


class StockWorker:
    """Stock mlx-lm modules and ``generate_step`` on the GGUF's weights (fp32 or native 4-bit)."""

    def __init__(self, config: str, gguf: Path) -> None:
        from octomil.models.gguf import load_gguf

        self.model, _, _ = load_gguf(gguf)
        fp32 = config in ("mlx-lm-fp32", "mlx-lm-fp32-sgemv")
        if fp32:
            from octomil.models.layout import convert_precision

            convert_precision(self.model, "float32")
        self.info = weight_bytes(self.model) | {
            "description": "mlx-lm llama.Model + generate_step, "
            + ("dequantized to float32" if fp32 else "native GGUF 4-bit (MLX quantized)"),
            "source": str(gguf),
            "blas": blas.describe(),
        }

    def generate(self, ids: list[int], max_tokens: int) -> dict:
        from mlx_lm.generate import generate_step

        # generate_step never stops on EOS: it yields exactly max_tokens tokens (greedy by default).
        start = time.perf_counter()
        stamps, tokens = [], []
        for token, _ in generate_step(mx.array(ids), self.model, max_tokens=max_tokens):
            stamps.append(time.perf_counter())
            tokens.append(int(token))
        return {
            "tokens": tokens,
            "ttft_s": stamps[0] - start,
            "decode_s": stamps[-1] - stamps[0],
            "avg_layers": float(self.info["total_layers"]),
            "exited": 0,
        }


# --- micro-benchmark: one token's matrix-vector products in MLX ----------------------------------


def _best_ms(fn, rounds: int, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(repeats):
            fn()
        best = min(best, (time.perf_counter() - t) / repeats * 1000)
    return best


def mlx_micro(dims: dict, layers: int, rounds: int, fp32_only: bool = False) -> dict:
    """Times one token's products through ``layers`` distinct random layers and the head.

    Distinct weights per layer, as in a real model: reusing one matrix would be served from cache.
    Variants: fp32 (out, in) as mlx-lm stores it, fp32 (in, out) as Octomil may store it, and MLX
    4-bit quantized (group 32, the GGUF's Q4_1 layout); each evaluated per product (one eval per
    call, as a layer-by-layer loop would) and as one graph (one eval for the whole token).
    """
    shapes = projection_shapes(dims)
    d, vocab = dims["hidden_size"], dims["vocab_size"]
    mx.random.seed(0)
    x = mx.random.normal((1, d))
    xf = mx.random.normal((1, dims["intermediate_size"]))
    ws = []  # (out, in) fp32 matrices, all layers then the head
    for _ in range(layers):
        ws += [mx.random.normal((o, i)) * 0.02 for _, o, i in shapes]
    ws.append(mx.random.normal((vocab, d)) * 0.02)
    mx.eval(ws)
    wts = [mx.contiguous(w.T) for w in ws]
    mx.eval(wts)
    qs = [mx.quantize(w, group_size=32, bits=4) for w in ws]
    mx.eval(qs)

    def inp(w_in: int) -> mx.array:
        return x if w_in == d else xf

    variants = {
        "fp32 (out, in)": lambda w, wt, q: inp(w.shape[1]) @ w.T,
        "fp32 (in, out)": lambda w, wt, q: inp(w.shape[1]) @ wt,
        "4-bit quantized": lambda w, wt, q: mx.quantized_matmul(
            inp(w.shape[1]), *q, transpose=True, group_size=32, bits=4
        ),
    }
    if fp32_only:
        del variants["4-bit quantized"]
    flops = sum(2 * w.shape[0] * w.shape[1] for w in ws)
    out: dict = {"layers": layers, "flops_per_token": flops, "variants": {}}
    items = list(zip(ws, wts, qs, strict=True))
    for name, f in variants.items():

        def per_call(f=f) -> None:
            for w, wt, q in items:
                mx.eval(f(w, wt, q))

        def one_graph(f=f) -> None:
            mx.eval([f(w, wt, q) for w, wt, q in items])

        per_shape = {}
        for (label, *_), w, wt, q in zip(shapes, ws, wts, qs, strict=False):
            per_shape[label] = _best_ms(
                lambda w=w, wt=wt, q=q, f=f: mx.eval(f(w, wt, q)), rounds, 20
            )
        head = items[-1]
        per_shape["head"] = _best_ms(lambda f=f, h=head: mx.eval(f(*h)), rounds, 5)
        out["variants"][name] = {
            "per_call_ms": _best_ms(per_call, rounds, 1),
            "one_graph_ms": _best_ms(one_graph, rounds, 1),
            "per_shape_ms": per_shape,
            "weight_bytes": sum(w.nbytes for w in ws)
            if name.startswith("fp32")
            else sum(a.nbytes for q in qs for a in q),
        }
    return out


# --- main loop -----------------------------------------------------------------------------------


def serve(worker, proto) -> None:
    for line in sys.stdin:
        req = json.loads(line)
        op = req["op"]
        if op == "quit":
            break
        if op == "generate":
            mx.reset_peak_memory()
            reply = worker.generate(req["ids"], req["max_tokens"]) | memory()
        elif op == "encode":
            reply = {"ids": worker.encode(req["text"])}
        elif op == "micro":
            reply = mlx_micro(
                req["dims"], req["layers"], req["rounds"], req.get("fp32_only", False)
            )
        else:
            reply = {"error": f"unknown op {op!r}"}
        proto.write(json.dumps(reply) + "\n")
        proto.flush()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config")
    ap.add_argument("--gguf", type=Path)
    ap.add_argument("--exit-policy", help="Engine.load(exit_policy=...); default: the engine's own")
    args = ap.parse_args()

    # Keep the protocol on the real stdout; anything printed by libraries (even from C) -> stderr.
    proto = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    start = time.perf_counter()
    if args.config in OCTOMIL_PRESETS:
        worker = OctomilWorker(args.config, args.exit_policy)
    elif args.config in ("mlx-lm-fp32", "mlx-lm-fp32-sgemv", "mlx-lm-4bit"):
        worker = StockWorker(args.config, args.gguf)
    elif args.config == "mlx-micro":
        worker = None
    else:
        raise SystemExit(f"unknown configuration {args.config!r}")
    info = {} if worker is None else dict(worker.info)
    info |= {"load_s": time.perf_counter() - start, "after_load": memory()}
    info |= {"peak_reset": reset_peaks(), "pid": os.getpid(), "octomil": octomil.__version__}
    proto.write(json.dumps({"ready": True, "info": info}) + "\n")
    proto.flush()
    serve(worker, proto)


if __name__ == "__main__":
    main()
