"""Render the performance report (REPORT.md + PNG plots) from report.py's JSON, and nothing else.

Kept apart from the measuring code so the report can be re-rendered without re-running it
(``report.py --render-only``) and so its pure helpers are testable without MLX.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from serve_render import kept_section

FULL, STOCK = "octomil-full", "mlx-lm-fp32"
# Stock mlx-lm in a process where Octomil's few-row BLAS route is active (octomil.blas.route):
# shows which part of Octomil's gain is that BLAS fix and which the engine's own.
ROUTED = "mlx-lm-fp32-sgemv"
PRESETS = ("octomil-quality", "octomil-balanced", "octomil-fast")
Q4, LLAMA, LLAMA1 = "mlx-lm-4bit", "llama.cpp", "llama.cpp-1-thread"
LLAMAS = (LLAMA, LLAMA1)
CONFIGS = (FULL, *PRESETS, STOCK, ROUTED, Q4, *LLAMAS)
LABELS = {
    FULL: "Octomil full depth",
    "octomil-quality": "Octomil preset quality",
    "octomil-balanced": "Octomil preset balanced",
    "octomil-fast": "Octomil preset fast",
    STOCK: "stock mlx-lm, same weights (fp32)",
    ROUTED: "stock mlx-lm (fp32) + Octomil's BLAS route",
    Q4: "stock mlx-lm, native 4-bit",
    LLAMA: "llama.cpp Q4_1, 2 threads",
    LLAMA1: "llama.cpp Q4_1, 1 thread",
}
COLORS = {FULL: "#4c72b0", STOCK: "#8c8c8c", ROUTED: "#64b5cd", Q4: "#b0b0b0"}
COLORS |= {LLAMA: "#937860", LLAMA1: "#c9a98a"}
COLORS |= dict(zip(PRESETS, ("#55a868", "#dd8452", "#c44e52"), strict=True))
MARKERS = dict(zip(CONFIGS, "osD^vP*Xh", strict=True))
MB = 1e6


# --- pure helpers --------------------------------------------------------------------------------


def fmt(value: float | None, spec: str = ".1f", suffix: str = "") -> str:
    return "–" if value is None else f"{value:{spec}}{suffix}"


def pct(value: float | None, spec: str = ".1f") -> str:
    return fmt(None if value is None else 100 * value, spec, "%")


def para(text: str) -> str:
    """One markdown paragraph from a wrapped (triple-quoted) string."""
    return " ".join(text.split())


def md_table(headers: list[str], rows: list[list[str]], align: str | None = None) -> str:
    """GitHub markdown table; ``align``: one letter per column (l/r/c), default first l, rest r."""
    align = align or "l" + "r" * (len(headers) - 1)
    marks = {"l": ":---", "r": "---:", "c": ":---:"}
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(marks[a] for a in align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _relative(text: str) -> str:
    """Paths into the package, relative to whichever checkout made the run."""
    return re.sub(r"/\S*/(src/octomil/)", r"\1", text)


def present(summary: dict) -> list[str]:
    return [c for c in CONFIGS if c in summary]


# --- plots ---------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_tok_s(result: dict, path: Path) -> None:
    """Decode tok/s per configuration, each with its bandwidth ceiling marked."""
    plt = _pyplot()
    s, m = result["summary"], result["machine"]
    configs = present(s)
    fig, ax = plt.subplots(figsize=(11, 5.2))
    xs = list(range(len(configs)))
    rates = [s[c]["decode_tok_s"] for c in configs]
    ceilings = [s[c]["ceiling_tok_s"] for c in configs]
    bars = ax.bar(xs, rates, color=[COLORS[c] for c in configs], width=0.6, zorder=2)
    bw = result["bandwidth"]["read_gb_s"]
    ax.scatter(
        xs,
        ceilings,
        marker="_",
        s=900,
        linewidths=2.5,
        color="black",
        zorder=3,
        label=f"bandwidth ceiling: {bw:.1f} GB/s / weight bytes per token",
    )
    for bar, c in zip(bars, configs, strict=True):
        row, x = s[c], bar.get_x() + bar.get_width() / 2
        text = f"{row['decode_tok_s']:.1f}\n{100 * row['share_of_ceiling']:.0f}% of ceiling"
        ax.annotate(text, (x, bar.get_height()), ha="center", va="bottom", fontsize=8)
        ax.annotate(
            f"{row['ceiling_tok_s']:.0f}",
            (x, row["ceiling_tok_s"]),
            xytext=(0, 6),
            textcoords="offset points",
            ha="center",
            fontsize=7,
        )
    names = [LABELS[c].replace(", ", ",\n").replace("Octomil ", "Octomil\n") for c in configs]
    ax.set_xticks(xs, names, fontsize=8)
    ax.set_ylabel("decode tokens/s (greedy, higher is better)")
    ax.set_ylim(0, max(ceilings + rates) * 1.15)
    ax.grid(axis="y", alpha=0.3, zorder=0)
    ax.legend(loc="upper left", fontsize=8)
    title = f"{m['model']}: decode speed, {result['settings']['max_tokens']} new tokens, "
    ax.set_title(title + f"{m['cpu_cores']} cores ({m['cpu_model']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_speed_vs_agreement(result: dict, path: Path) -> None:
    """Decode tok/s against per-position agreement with Octomil full depth."""
    plt = _pyplot()
    from matplotlib.ticker import ScalarFormatter

    s = result["summary"]
    fig, ax = plt.subplots(figsize=(12, 5.2))
    for c in present(s):
        row = s[c]
        x, y = 100 * row["position_agreement"], row["decode_tok_s"]
        label = f"{LABELS[c]}: {y:.1f} tok/s, {x:.0f}% agree, {100 * row['exact_match']:.0f}% exact"
        ax.scatter(
            x, y, s=80, color=COLORS[c], marker=MARKERS[c], alpha=0.85, zorder=3, label=label
        )
    ax.set_xlim(-5, 105)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(ScalarFormatter())
    ax.tick_params(axis="y", which="minor", labelsize=7)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, borderaxespad=0)
    ax.set_xlabel("per-position token agreement with Octomil full depth, % (free-running greedy)")
    ax.set_ylabel("decode tokens/s (log scale)")
    ax.grid(alpha=0.3, which="both")
    ax.set_title("Speed vs agreement with Octomil full depth", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- markdown ------------------------------------------------------------------------------------


def _header(result: dict) -> list[str]:
    m, st, ll = result["machine"], result["settings"], result["llamacpp"]
    loads = m["load_average_1m"]
    if ll["available"]:
        built = f", built from source in {ll['build_s'] / 60:.1f} min" if ll.get("build_s") else ""
        llama = f"llama-cpp-python {ll['version']}{built}"
        llama += f", in the benchmark-only environment `{ll['env']}`"
        info = result["infos"].get(LLAMA, {})
        if info.get("extra_buffers_crashed"):
            llama += """; weights in plain CPU buffers, because with llama.cpp's extra buffer types
            (AMX / repacked weights, chosen on this CPU) its first decode crashed"""
        llama += "."
    else:
        llama = f"**skipped**: {ll['reason']}."
    return [
        "# Octomil performance report",
        "",
        para(f"""Generated by `benchmarks/report.py` into `benchmarks/results/report.json` and
        rendered from it; do not edit by hand. Re-run: `{st["command"]}` (or `make bench-report`).
        """),
        "",
        para(f"""- Machine: {m["cpu_model"]}, {m["cpu_cores"]} cores; Python {m["python"]}, MLX
        {m["mlx"]}, mlx-lm {m["mlx_lm"]}, numpy {m["numpy"]}; MLX uses {m["blas"]}."""),
        para(f"""- Model: {m["model"]} ({m["total_layers"]} layers), GGUF `{Path(m["gguf"]).name}`
        ({m["gguf_bytes"] / MB:.1f} MB)."""),
        para(f"""- Date {m["date"]}, commit `{m["git_commit"]}`, wall time
        {result["wall_time_s"]:.0f} s. 1-minute load average during the run, this run's own
        processes included: {min(loads):.1f} to {max(loads):.1f}."""),
        para(f"""- Workload: {st["prompts"]} chat prompts from `{st["prompts_file"]}`
        ({min(st["prompt_tokens"])} to {max(st["prompt_tokens"])} prompt tokens), greedy, exactly
        {st["max_tokens"]} new tokens each (EOS ignored); stock 4-bit on
        {len(st["q4_prompt_indices"])} of them. Long-prompt prefill: one
        {st["long_prompt_tokens"]}-token prompt, {st["long_prompt_reps"]} times."""),
        *_quiet(result),
        f"- Early exit: {_relative(result['infos'][FULL]['exit_policy'])}",
        para(f"- llama.cpp: {llama}"),
    ]


def _quiet(result: dict) -> list[str]:
    """One bullet on the other processes that shared the cores during the rounds."""
    records = [r for r in result.get("quiet", []) if r["busy_cores"] is not None]
    if not records:
        return []
    gate = result["settings"]["quiet_gate"]
    busy = sorted(r["busy_cores"] for r in records)
    loud = sum(r["busy_cores"] > gate["threshold_cores"] for r in records)
    waited = sum(r["waited_s"] for r in records)
    return [
        para(f"""- Other processes' CPU use, sampled for 1 s before each of {len(records)} rounds
        (after waiting up to {gate["max_wait_s"]:g} s, {gate["budget_s"]:g} s in all, for it to
        drop below {gate["threshold_cores"]:g} cores): median {busy[len(busy) // 2]:.2f}, max
        {busy[-1]:.2f} cores; {loud} rounds started above the threshold; waited {waited:.0f} s.""")
    ]


def _headline(s: dict) -> str:
    rows = []
    for c in present(s):
        r = s[c]
        rows.append(
            [
                LABELS[c],
                fmt(r["decode_tok_s"]),
                fmt(r.get("decode_vs_full"), ".2f", "x"),
                fmt(r.get("decode_vs_mlx_lm"), ".2f", "x"),
                fmt(r["prefill_tok_s"], ".0f"),
                fmt(r["ttft_ms"], ".0f"),
                fmt(r["avg_layers_used"]),
                pct(r["position_agreement"]),
                f"{100 * r['exact_match']:.0f}% of {r['prompts']}",
            ]
        )
    headers = [
        "configuration",
        "decode tok/s",
        "vs Octomil full",
        "vs mlx-lm fp32",
        "prefill tok/s",
        "TTFT ms",
        "avg layers",
        "token agreement",
        "exact sequences",
    ]
    return md_table(headers, rows)


def _contention_note(s: dict, cap_s: float | None) -> list[str]:
    """Say so when llama.cpp on two threads lost to one thread: the cores were shared."""
    out = []
    if LLAMA in s and LLAMA1 in s and s[LLAMA1]["decode_tok_s"] > s[LLAMA]["decode_tok_s"]:
        out.append(
            para(f"""Note: llama.cpp decoded faster on 1 thread ({s[LLAMA1]["decode_tok_s"]:.1f}
            tok/s) than on 2 ({s[LLAMA]["decode_tok_s"]:.1f}). Its threads meet in spinning
            barriers at every operation, so when another process occupies a core the two threads
            wait for each other; on an idle 2-core machine 2 threads are faster. Read the
            comparison with the load average above in mind.""")
        )
    cut = {c: s[c].get("truncated_runs", 0) for c in present(s)}
    for c, n in cut.items():
        if n:
            out.append(
                para(f"""{LABELS[c]}: {n} of {s[c]["prompts"]} generations stalled and were cut
                off after {cap_s:g} s; the tokens they produced count in its decode speed and
                agreement.""")
            )
    return [x for p in out for x in ("", p)]


def _ceilings(result: dict) -> list[str]:
    s, bw = result["summary"], result["bandwidth"]
    rows = [
        [
            LABELS[c],
            fmt(s[c]["bytes_per_token_mb"]),
            fmt(s[c]["ceiling_tok_s"], ".0f"),
            fmt(s[c]["decode_tok_s"]),
            pct(s[c]["share_of_ceiling"], ".0f"),
        ]
        for c in present(s)
    ]
    return [
        "## Distance to the memory-bandwidth limit",
        "",
        para(f"""Measured in this run: streaming read {bw["read_gb_s"]:.1f} GB/s (numpy sum over
        {bw["array_mb"]} MB, best of 1 thread {bw["read_1_thread_gb_s"]:.1f} and 2 threads
        {bw["read_2_threads_gb_s"]:.1f} GB/s, before and after the configurations ran), copy
        {bw["copy_gb_s"]:.1f} GB/s (read + write bytes). Decoding a token streams every weight it
        uses once, so weight bytes per token / bandwidth is a floor on the time per token and
        bandwidth / bytes per token a ceiling on tok/s."""),
        "",
        md_table(
            ["configuration", "weight MB / token", "ceiling tok/s", "decode tok/s", "of ceiling"],
            rows,
        ),
        "",
        para("""Weight bytes per token: for the MLX models, parameter bytes of the decoder layers
        plus the head (the tied embedding matrix) and final norm; presets scale the layer part by
        average layers used / total (their exit-check reads are not counted, so their ceiling is
        optimistic); llama.cpp: the GGUF file size."""),
    ]


def _prefill_memory(result: dict) -> list[str]:
    s, st = result["summary"], result["settings"]
    rows = [
        [
            LABELS[c],
            fmt(s[c]["prefill_tok_s"], ".0f"),
            fmt(s[c]["ttft_ms"], ".0f"),
            fmt(s[c]["long_prefill_tok_s"], ".0f"),
            fmt(s[c].get("long_prefill_vs_full"), ".2f", "x"),
            fmt(s[c].get("long_prefill_vs_mlx_lm"), ".2f", "x"),
            fmt(s[c]["rss_after_load_mb"], ".0f"),
            fmt(s[c]["rss_peak_mb"], ".0f"),
            fmt(s[c]["mlx_peak_mb"], ".0f"),
            fmt(s[c]["load_s"]),
        ]
        for c in present(s)
    ]
    headers = [
        "configuration",
        "prefill tok/s (chat prompts)",
        "TTFT ms",
        f"prefill tok/s ({st['long_prompt_tokens']} tokens)",
        "vs Octomil full",
        "vs mlx-lm fp32",
        "RSS after load MB",
        "peak RSS MB",
        "MLX peak MB",
        "load s",
    ]
    return [
        "## Prefill and memory",
        "",
        md_table(headers, rows),
        "",
        para("""Prefill tok/s = prompt tokens / time to first token (TTFT: prefill plus the first
        token), median over prompts (and over the repetitions of the long prompt). The long prompt
        runs on Octomil full depth (the presets prefill at full depth too), stock mlx-lm fp32 and
        llama.cpp; 4-bit MLX prefill is too slow to include."""),
        "",
        para("""Memory: each configuration runs in its own process. RSS after load: resident memory
        once loaded. Peak RSS: that process's high-water mark (VmHWM) from the end of loading
        through all its generations (reset after loading with /proc/self/clear_refs, so load-time
        transients are excluded). MLX peak: `mx.get_peak_memory()` during one generation (the MLX
        allocator's peak, weights included), the largest over the run. llama.cpp maps the GGUF
        file, so its RSS counts the mapped weights."""),
    ]


def _agreement(result: dict) -> list[str]:
    s = result["summary"]
    rows = [
        [
            LABELS[c],
            pct(s[c]["position_agreement"]),
            pct(s[c]["prefix_agreement"]),
            pct(s[c]["exact_match"], ".0f"),
            fmt(s[c]["avg_layers_used"], ".2f"),
            pct(s[c]["early_exit_share"]),
        ]
        for c in present(s)
    ]
    headers = [
        "configuration",
        "per-position agreement",
        "tokens before first difference",
        "exact sequences",
        "avg layers",
        "tokens exited early",
    ]
    return [
        "## Agreement with Octomil full depth",
        "",
        md_table(headers, rows),
        "",
        para("""Per-position agreement: share of the positions of the greedy sequence where the
        configuration emits the same token as Octomil full depth on the same prompt. It is
        free-running, so after a first difference the sequences usually drift apart;
        `benchmarks/engine_bench.py` measures the presets' teacher-forced agreement. llama.cpp
        computes with Q4_1 weights and 8-bit activations, the 4-bit MLX model with MLX's 4-bit
        kernels, so neither is expected to match fp32 token for token."""),
    ]


def _gap(result: dict) -> list[str]:
    g, s = result["gap"], result["summary"]
    if not g:
        return []
    out = ["## Where the gap to llama.cpp comes from", ""]
    if "llamacpp_ms" in g:
        out.append(
            para(f"""Octomil full depth spends {g["octomil_ms"]:.1f} ms per token, llama.cpp
            {g["llamacpp_ms"]:.1f} ms ({LABELS[g["llamacpp_config"]]}, the faster llama.cpp
            configuration of this run: {g["llamacpp_speedup"]:.1f}x faster). The parts, measured
            in this run:""")
        )
    else:
        out.append("llama.cpp was skipped in this run; the parts of Octomil's time per token:")
    q4 = ""
    if "q4_bytes_mb" in g:
        q4 = f""", against {g["q4_bytes_mb"]:.0f} MB and {g["q4_floor_ms"]:.1f} ms for llama.cpp's
        Q4_1 ({g["bytes_ratio"]:.1f}x fewer bytes)"""
    q4_kernel = "."
    if g.get("mlx_q4_matvec_ms"):
        q4_kernel = f""": one token's 4-bit products take {g["mlx_q4_matvec_ms"]:.1f} ms in MLX
        against {g["mlx_matvec_ms"]:.1f} ms in fp32 (micro-benchmark below)"""
        if Q4 in s:
            q4_kernel += f"""; stock mlx-lm on the 4-bit weights decodes
            {s[Q4]["decode_tok_s"]:.1f} tok/s."""
        else:
            q4_kernel += "."
    slower = g["mlx_matvec_ms"] - g["numpy_matvec_ms"]
    if slower > 0:
        verdict = f"""MLX's products take {slower:.1f} ms per token more than the same products
        through OpenBLAS called directly: that part belongs to MLX's CPU backend."""
    else:
        verdict = f"""MLX's products take {-slower:.1f} ms per token less than numpy's calls of
        OpenBLAS here, so MLX's fp32 matrix-vector path is not behind a direct BLAS call."""
    out += [
        "",
        para(f"""1. **Weight precision (MLX's CPU backend).** Octomil serves fp32 weights:
        {g["fp32_bytes_mb"]:.0f} MB per token, a bandwidth floor of
        {g["fp32_floor_ms"]:.1f} ms{q4}. It does so because MLX's CPU backend has no fast
        quantized (or half-precision) matrix-vector kernel{q4_kernel}"""),
        para(f"""2. **Matrix-vector efficiency.** One token's fp32 products alone take
        {g["mlx_matvec_ms"]:.1f} ms in MLX ({g["mlx_matvec_gb_s"]:.1f} GB/s of weights) and
        {g["numpy_matvec_ms"]:.1f} ms through numpy's OpenBLAS ({g["numpy_matvec_gb_s"]:.1f} GB/s;
        best numpy variant: {g.get("numpy_matvec_variant", "numpy")}),
        against the {g["fp32_floor_ms"]:.1f} ms floor. {verdict}"""),
        para(f"""3. **Everything else in Octomil's step: {g["other_ms"]:.1f} ms per token**
        (attention over the KV cache, norms, RoPE, the argmax, building and evaluating the MLX
        graph from Python): shared between MLX's per-operation overhead and Octomil's own code,
        and the part the full-depth engine work can still remove."""),
    ]
    if "llamacpp_ms" in g:
        best = 1000 / g["fp32_floor_ms"]
        ratio = 1000 / g["llamacpp_ms"] / best
        if ratio >= 1:
            tail = f"""llama.cpp already decodes {ratio:.1f}x that on Q4_1. Matching it needs fewer
            bytes per token (a fast quantized or half-precision CPU kernel in MLX), not only
            faster fp32 code."""
        else:
            tail = f"""that is {1 / ratio:.1f}x llama.cpp's speed in this run, but llama.cpp's own
            ceiling on Q4_1 is {g["bytes_ratio"]:.1f}x higher: in the long run, matching it needs
            fewer bytes per token (a fast quantized or half-precision CPU kernel in MLX)."""
        out += [
            "",
            para(f"At the fp32 bandwidth floor Octomil would decode {best:.0f} tok/s; " + tail),
        ]
    return out


def _micro(result: dict) -> list[str]:
    micro, dims = result["micro_summary"], result["micro"]["dims"]
    layers = result["micro"]["mlx"]["layers"]
    shapes = ["q", "k", "v", "o", "gate", "up", "down", "head"]
    rows = [
        [
            name,
            fmt(v["ms_per_token"]),
            fmt(v["gflop_s"]),
            fmt(v["gb_s"]),
            fmt(v["weight_mb"], ".0f"),
            fmt(v["bandwidth_floor_ms"]),
        ]
        for name, v in micro.items()
    ]
    per_shape = [
        [name] + [fmt(v["per_shape_ms"].get(k), ".3f") for k in shapes]
        for name, v in micro.items()
        if "one graph" not in name
    ]
    return [
        "## Micro-benchmark: one token's matrix-vector products",
        "",
        para(f"""Random weights with the model's shapes: {layers} distinct layers (q, k, v, o,
        gate, up, down; hidden {dims["hidden_size"]}, MLP {dims["intermediate_size"]}) plus the
        {dims["vocab_size"]} x {dims["hidden_size"]} head, distinct so that no weight is served
        from cache; a 1-row input; best of several rounds. "Per call": one evaluation per product,
        as a layer-by-layer loop does; "one graph": all products of the token in one evaluation.
        numpy calls its bundled OpenBLAS (sgemv) with 2 and with 1 thread (1 thread is the robust
        figure when another process holds a core: 2 threads wait for each other); MLX uses the
        system OpenBLAS that Octomil preloads for fp32, and its own kernel for 4-bit (group size
        32, as Q4_1). "mlx" rows run with Octomil's few-row route (`octomil.blas.route`, as the
        BLAS line at the top says: products of up to 4 rows through OpenBLAS's sgemv until
        2026-12, then the rows kernel), "mlx-sgemm" rows without it (every product through
        sgemm, as MLX itself calls it). (out, in) is mlx-lm's weight storage, (in, out) the
        transposed one Octomil picks when faster."""),
        "",
        md_table(
            [
                "backend / weights",
                "ms per token",
                "GFLOP/s",
                "GB/s of weights",
                "weight MB",
                "bandwidth floor ms",
            ],
            rows,
        ),
        "",
        "Per product (ms per call; one matrix called repeatedly, so small ones stay in cache):",
        "",
        md_table(["backend / weights", *shapes], per_shape),
    ]


def _method(result: dict) -> list[str]:
    info = result["infos"][FULL]
    return [
        "## Method",
        "",
        para(f"""- Octomil: `Engine.load()` (weight layout chosen at load: {info["layout"]});
        presets via `resolve_early_exit(preset)`; requests `GenerationRequest(ids,
        SamplingParams(max_tokens=N, ignore_eos=True), settings)`, timings from the Generation's
        stats."""),
        para("""- Stock mlx-lm: `octomil.models.gguf.load_gguf` into mlx-lm's own `llama.Model`,
        then `dequantize_model` and `set_dtype(float32)` (fp32) or left as MLX 4-bit (native);
        `mlx_lm.generate.generate_step` (greedy, never stops on EOS), timed at each token. "Stock"
        runs with the system OpenBLAS preloaded (as the BRIEF's baseline) and
        `OCTOMIL_NO_BLAS_ROUTE=1`; the "+ Octomil's BLAS route" row is the same code in a process
        where the route is active, to separate that BLAS fix from the rest of Octomil's engine."""),
        para("""- llama.cpp: `Llama(n_threads=N, n_threads_batch=N, n_batch=512)` with N = 2 and
        N = 1 (two processes), `reset()` before
        every prompt (no KV prefix reuse), `generate(temp=0, top_k=1, repeat_penalty=1)`, which
        does not stop on EOS; run by `benchmarks/llamacpp_runner.py` in its own environment."""),
        para("""- Every configuration gets the same token ids (Octomil's tokenizer and chat
        template) and runs in its own process; all stay loaded and take each prompt in turn
        (round-robin, starting point rotated per prompt, one process working at a time) after one
        warm-up each. Decode tok/s = tokens after the first / time from the first to the last
        token, median over prompts (total tokens / total time is in the JSON as
        `decode_tok_s_pooled`; one stalled generation moves it a lot on a shared machine)."""),
    ]


def render_markdown(result: dict, png: dict[str, str], sections: list[str] | None = None) -> str:
    """The report; ``sections``: markdown lines of other benchmarks' sections, before the method."""
    out = _header(result)
    out += ["", "## Headline", "", _headline(result["summary"]), ""]
    out += [
        para("""Decode tok/s: (tokens - 1) / time from the first to the last token; prefill tok/s:
        prompt tokens / time to first token (TTFT); all medians over prompts. Ratios divide decode
        tok/s. Token agreement: per-position match with Octomil full depth's greedy tokens.""")
    ]
    out += _contention_note(result["summary"], result["settings"].get("llamacpp_max_seconds")) + [
        ""
    ]
    out += [f"![decode tok/s by configuration with bandwidth ceilings]({png['tok_s']})", ""]
    out += _ceilings(result) + [""]
    out += _prefill_memory(result) + [""]
    out += _agreement(result) + ["", f"![speed vs agreement]({png['agreement']})", ""]
    gap = _gap(result)
    out += gap + [""] if gap else []
    out += _micro(result) + [""]
    out += [*sections, ""] if sections else []
    out += _method(result)
    return "\n".join(out) + "\n"


def render(result: dict, json_path: Path, md_path: Path) -> None:
    pngs = {
        "tok_s": json_path.with_name(json_path.stem + "_tok_s.png"),
        "agreement": json_path.with_name(json_path.stem + "_speed_vs_agreement.png"),
    }
    plot_tok_s(result, pngs["tok_s"])
    plot_speed_vs_agreement(result, pngs["agreement"])
    rel = {k: os.path.relpath(p, md_path.parent) for k, p in pngs.items()}
    from rows_render import load, report_section  # imports this module: not at the top

    rows = load(json_path.with_name("rows.json"))
    png = os.path.relpath(json_path.with_name("rows.png"), md_path.parent)
    sections = report_section(rows, png) if rows else None
    # The serving section belongs to serve_render.py: carried over as it is.
    kept = kept_section(md_path.read_text()) if md_path.exists() else ""
    md_path.write_text(render_markdown(result, rel, sections) + ("\n" + kept if kept else ""))


def print_headline(result: dict) -> None:
    s = result["summary"]
    print(
        f"\n{'configuration':<36}{'decode':>8}{'vs full':>9}{'vs mlx':>8}{'prefill':>9}"
        f"{'TTFT ms':>9}{'layers':>8}{'agree':>8}{'ceiling':>9}"
    )
    for c in present(s):
        r = s[c]
        cells = [
            fmt(r["decode_tok_s"]),
            fmt(r.get("decode_vs_full"), ".2f", "x"),
            fmt(r.get("decode_vs_mlx_lm"), ".2f", "x"),
            fmt(r["prefill_tok_s"], ".0f"),
            fmt(r["ttft_ms"], ".0f"),
            fmt(r["avg_layers_used"]),
            pct(r["position_agreement"]),
            fmt(r["ceiling_tok_s"], ".0f"),
        ]
        widths = (8, 9, 8, 9, 9, 8, 8, 9)
        print(f"{LABELS[c]:<36}" + "".join(f"{x:>{w}}" for x, w in zip(cells, widths, strict=True)))
    ll = result["llamacpp"]
    print(
        f"bandwidth {result['bandwidth']['read_gb_s']:.1f} GB/s; llama.cpp: "
        + (ll.get("version") or ll.get("reason", ""))
    )
