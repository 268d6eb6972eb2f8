"""Where one full-depth decode step's time goes, on the embedded model, in one run.

The profile behind the full-depth engine work (issue 5): each part of a token's step is timed
alone at the model's shapes, 30 layers' worth, and the whole step with and without each of
Octomil's changes, in the same process, interleaved, median of many repetitions:

- whole step: the model's forward pass for one token over a KV cache of ``--context`` tokens
  plus the greedy argmax, evaluated synchronously (no run-ahead), for the engine's model (table
  RoPE, compiled RMS norm: ``octomil.models.fast_modules``) and mlx-lm's own, each with
  Octomil's few-row BLAS route on and off;
- parts: the fp32 products of every layer and the head (one graph), RoPE and RMS norms (mlx's
  ``fast`` ops vs the engine's modules), the attention core
  (``mx.fast.scaled_dot_product_attention``) over the cache, the head's argmax, and building the
  step's graph in Python (no evaluation).

The parts overlap with what MLX does per operation, so they do not add up exactly to the step;
the remainder is reported as "other" (MLX's per-operation overhead, cache writes, reshapes).

    .venv/bin/python benchmarks/step_profile.py   # ~2 min: results/step_profile.json + .png
"""

from __future__ import annotations

import octomil  # noqa: F401  (first: OpenBLAS and the BLAS route load before mlx)

# isort: split
import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
from engine_bench import cpu_model, git_commit
from mlx_lm.models.cache import make_prompt_cache

from octomil import blas
from octomil.blas import route
from octomil.models.loader import load, load_stock_model
from octomil.models.rope_table import TableRoPE

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "step_profile.json"


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def step_fn(model, context: int) -> Callable[[], None]:
    """One synchronous greedy decode step over ``context`` cached tokens (cache trimmed back)."""
    cache = make_prompt_cache(model)
    model(mx.array([[(7 * i) % 1000 + 100 for i in range(context)]]), cache=cache)
    mx.eval([c.state for c in cache])
    token = mx.array([[42]])

    def step() -> None:
        logits = model(token, cache=cache)
        mx.eval(mx.argmax(logits[:, -1], axis=-1))
        for c in cache:
            c.trim(1)

    return step


def products_ms(model, repeats: int) -> float:
    """One token's products through every layer's projections and the head, in one graph."""
    args, layers, head = model.args, model.model.layers, model.model.embed_tokens
    x = mx.random.normal((1, 1, args.hidden_size))
    wide = mx.random.normal((1, 1, args.intermediate_size))
    mx.eval(x, wide)

    def products() -> None:
        outs = []
        for layer in layers:
            a, m = layer.self_attn, layer.mlp
            outs += [a.q_proj(x), a.k_proj(x), a.v_proj(x), a.o_proj(x)]
            outs += [m.gate_proj(x), m.up_proj(x)]
            outs.append(m.down_proj(wide))
        outs.append(head.as_linear(x))
        mx.eval(outs)

    return median_ms(products, repeats)


def parts(model, context: int, repeats: int) -> dict[str, float]:
    args = model.args
    layers = model.model.layers
    d, heads, kv = args.hidden_size, args.num_attention_heads, args.num_key_value_heads
    head_dim = d // heads
    n = len(layers)
    x = mx.random.normal((1, 1, d))
    logits = mx.random.normal((1, args.vocab_size))
    q, k = mx.random.normal((1, heads, 1, head_dim)), mx.random.normal((1, kv, 1, head_dim))
    keys, values = (mx.random.normal((1, kv, context, head_dim)) for _ in range(2))
    mx.eval(x, logits, q, k, keys, values)
    attn = layers[0].self_attn
    table = attn.rope if isinstance(attn.rope, TableRoPE) else None
    stock_rope = table.original if table else attn.rope
    norms = [m for layer in layers for m in (layer.input_layernorm, layer.post_attention_layernorm)]
    norms.append(model.model.norm)

    result = {
        "products (layers + head, one graph)": products_ms(model, repeats),
        "RoPE, mx.fast.rope (2 per layer)": median_ms(
            lambda: mx.eval([stock_rope(t, offset=context) for t in (q, k) for _ in range(n)]),
            repeats,
        ),
        "RMS norms, mx.fast.rms_norm (2 per layer + final)": median_ms(
            lambda: mx.eval([mx.fast.rms_norm(x, n.weight, n.eps) for n in norms]), repeats
        ),
        "RMS norms, as the model runs them": median_ms(
            lambda: mx.eval([norm(x) for norm in norms]), repeats
        ),
        f"attention core over {context} cached tokens": median_ms(
            lambda: mx.eval(
                [
                    mx.fast.scaled_dot_product_attention(q, keys, values, scale=head_dim**-0.5)
                    for _ in range(n)
                ]
            ),
            repeats,
        ),
        "head argmax (49k logits)": median_ms(lambda: mx.eval(mx.argmax(logits, axis=-1)), repeats),
    }
    if table is not None:
        result["RoPE, shared table (2 per layer)"] = median_ms(
            lambda: mx.eval([table(t, offset=context) for t in (q, k) for _ in range(n)]), repeats
        )
    return result


def graph_build_ms(model, context: int, repeats: int) -> float:
    cache = make_prompt_cache(model)
    model(mx.array([[100 + i for i in range(context)]]), cache=cache)
    mx.eval([c.state for c in cache])
    token, times = mx.array([[42]]), []
    for _ in range(repeats):
        start = time.perf_counter()
        logits = model(token, cache=cache)
        times.append(time.perf_counter() - start)
        mx.eval(logits)
        for c in cache:
            c.trim(1)
    return statistics.median(times) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--context", type=int, default=128, help="cached tokens before the step")
    ap.add_argument("--repeats", type=int, default=41)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the whole steps")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()
    start = time.perf_counter()

    loaded = load(None)
    engine_model, stock = loaded.model, load_stock_model(loaded)
    steps = {
        "engine model (table RoPE, compiled RMS norm)": engine_model,
        "mlx-lm model (mx.fast.rope, mx.fast.rms_norm)": stock,
    }
    fns = {name: step_fn(model, args.context) for name, model in steps.items()}
    whole: dict[str, list[float]] = {}
    for _ in range(args.rounds):  # interleaved: machine noise hits every variant alike
        for name, fn in fns.items():
            whole.setdefault(f"{name}, BLAS route", []).append(median_ms(fn, args.repeats))
            with route.disabled():
                ms = median_ms(fn, args.repeats)
            whole.setdefault(f"{name}, sgemm (no route)", []).append(ms)
    step = {name: statistics.median(v) for name, v in whole.items()}
    part = parts(engine_model, args.context, args.repeats)
    with route.disabled():
        part["products, sgemm (no route)"] = products_ms(engine_model, 5)
    part["building the step's graph in Python"] = graph_build_ms(
        engine_model, args.context, args.repeats
    )
    engine_step = step["engine model (table RoPE, compiled RMS norm), BLAS route"]
    counted = [
        "products (layers + head, one graph)",
        "RoPE, shared table (2 per layer)",
        "RMS norms, as the model runs them",
        f"attention core over {args.context} cached tokens",
        "head argmax (49k logits)",
    ]
    breakdown = {k: part[k] for k in counted if k in part}
    breakdown["other (per-operation overhead, cache writes, reshapes, MLP activation)"] = max(
        0.0, engine_step - sum(breakdown.values())
    )
    result = {
        "command": f"python benchmarks/step_profile.py --context {args.context}",
        "machine": {
            "cpu_model": cpu_model(),
            "cpu_cores": os.cpu_count(),
            "mlx": mx.__version__,
            "blas": blas.describe(),
            "load_average_1m": os.getloadavg()[0],
            "git_commit": git_commit(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
        "context": args.context,
        "whole_step_ms": step,
        "whole_step_rounds_ms": whole,
        "parts_ms": part,
        "engine_step_breakdown_ms": breakdown,
        "wall_time_s": time.perf_counter() - start,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    plot(result, args.out.with_suffix(".png"))
    for name, ms in step.items():
        print(f"  step  {name:55s} {ms:7.2f} ms")
    for name, ms in part.items():
        print(f"  part  {name:55s} {ms:7.2f} ms")
    print(f"[profile] wrote {args.out} and its PNG in {result['wall_time_s']:.0f} s")


def plot(result: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5), width_ratios=(1, 1.3))
    step = result["whole_step_ms"]
    left.barh(list(step), list(step.values()), color="#4c72b0")
    left.set_xlabel("ms per decode step (lower is better)")
    left.set_title(f"whole step, {result['context']} cached tokens")
    left.invert_yaxis()
    acc = 0.0
    for name, ms in result["engine_step_breakdown_ms"].items():
        right.barh(["engine step"], [ms], left=acc, label=f"{name}: {ms:.1f} ms")
        acc += ms
    right.set_xlabel("ms")
    right.set_title("engine step (BLAS route, fast modules), by part")
    right.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    main()
