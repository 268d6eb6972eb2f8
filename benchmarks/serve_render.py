"""Tables and plot of the serving benchmark, from ``results/serve.json`` only.

``render_table`` gives the markdown for the README: one row per configuration and level, then
the issue's targets checked on the same run (Octomil at 16 clients vs one client, vs llama.cpp's
server; early exit on vs off). ``section`` wraps it with the method and the plot into the
"Serving" section of benchmarks/REPORT.md, kept between two marker comments so that report.py,
which rewrites the rest of that file, carries it over. ``plot`` draws aggregate output tok/s and
p95 inter-token latency against the number of clients.

    .venv/bin/python benchmarks/serve_render.py [results/serve.json] [--report benchmarks/REPORT.md]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_JSON = HERE / "results" / "serve.json"
DEFAULT_REPORT = HERE / "REPORT.md"
BEGIN = "<!-- serve_bench: begin (written by benchmarks/serve_render.py) -->"
END = "<!-- serve_bench: end -->"
BASE, BASE_NO_BATCH, BASE_EXIT, LLAMA = "octomil", "octomil-no-batch", "octomil-exit", "llama.cpp"


def _ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1e3:.0f}"


def _levels(result: dict) -> dict[str, dict[int, dict]]:
    return {
        c["name"]: {lv["concurrency"]: lv for lv in c["levels"]}
        for c in result["configs"]
        if c.get("levels")
    }


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a is not None and b else "n/a"


def short_reason(reason: str) -> str:
    """One table-safe line: what happened, and the log's last words (e.g. an unknown option)."""
    lines = [ln.strip(" \u2502\u256d\u2570\u2500\u256e\u256f|") for ln in reason.splitlines()]
    lines = [ln for ln in lines if ln]
    if not lines:
        return "?"
    first = lines[0].removesuffix("; log:")
    return first if len(lines) == 1 else f"{first}: {lines[-1][:100]}"


def render_table(result: dict) -> str:
    head = (
        "| server | clients | output tok/s | vs 1 client | requests/s | TTFT p50 / p95 (ms) "
        "| ITL p50 / p95 / p99 (ms) | layers/token | done / cut / errors |\n"
        "|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for c in result["configs"]:
        if not c.get("levels"):
            rows.append(
                f"| {c['name']} | - | not run: {short_reason(c.get('reason', '?'))} |||||||"
            )
            continue
        one = c["levels"][0]["output_tok_s"] if c["levels"][0]["concurrency"] == 1 else None
        for lv in c["levels"]:
            ttft, itl = lv["ttft_s"], lv["itl_s"]
            layers = lv["avg_layers_per_token"]
            rows.append(
                f"| {c['name']} | {lv['concurrency']} | {lv['output_tok_s']:.1f} "
                f"| {_ratio(lv['output_tok_s'], one)} | {lv['requests_per_s']:.2f} "
                f"| {_ms(ttft['p50'])} / {_ms(ttft['p95'])} "
                f"| {_ms(itl['p50'])} / {_ms(itl['p95'])} / {_ms(itl['p99'])} "
                f"| {'n/a' if layers is None else f'{layers:.1f}'} "
                f"| {lv['completed']} / {lv['cut']} / {lv['errors']} |"
            )
    return head + "\n".join(rows) + "\n\n" + render_targets(result)


def render_targets(result: dict) -> str:
    """The issue's targets as measured in this run (n/a where a level or server is missing)."""
    lv = _levels(result)
    base, exit_ = lv.get(BASE, {}), lv.get(BASE_EXIT, {})

    def get(levels: dict[int, dict], n: int, key: str, sub: str | None = None) -> float | None:
        v = levels.get(n, {}).get(key)
        return v.get(sub) if isinstance(v, dict) and sub else v

    tok16 = _ratio(get(base, 16, "output_tok_s"), get(base, 1, "output_tok_s"))
    itl16 = _ratio(get(base, 16, "itl_s", "p95"), get(base, 1, "itl_s", "p95"))
    lines = [
        f"- {BASE}, 16 clients vs 1: output tok/s {tok16} (target >= 4x); "
        f"p95 ITL {itl16} (target <= 2.5x)",
    ]
    for name in [n for n in lv if n.startswith(LLAMA)] or [LLAMA]:
        vs = _ratio(get(base, 16, "output_tok_s"), get(lv.get(name, {}), 16, "output_tok_s"))
        lines.append(f"- {BASE} vs {name} at 16 clients: output tok/s {vs} (target > 1x)")
    if exit_:
        ratios = ", ".join(
            f"{n}: {_ratio(get(exit_, n, 'output_tok_s'), get(base, n, 'output_tok_s'))}"
            for n in sorted(exit_)
        )
        lines.append(
            f"- early exit on ({BASE_EXIT}) / off ({BASE}), output tok/s by clients: {ratios}"
        )
    if BASE_NO_BATCH in lv:
        nb = lv[BASE_NO_BATCH]
        ratios = ", ".join(
            f"{n}: {_ratio(get(base, n, 'output_tok_s'), get(nb, n, 'output_tok_s'))}"
            for n in sorted(nb)
        )
        lines.append(
            f"- batching on ({BASE}) / off ({BASE_NO_BATCH}), output tok/s by clients: {ratios}"
        )
    m = result["machine"]
    lines.append(
        f"\n{m['cpu_model']}, {m['cpu_cores']} cores, load {m['load_average_1m']}, "
        f"{m['date']}, `{m['command']}`"
        + (" (smoke run: not a measurement)" if result.get("smoke") else "")
    )
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_tok, ax_itl) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, levels in _levels(result).items():
        ns = sorted(levels)
        ax_tok.plot(ns, [levels[n]["output_tok_s"] for n in ns], marker="o", label=name)
        itl = [levels[n]["itl_s"]["p95"] for n in ns]
        ax_itl.plot(ns, [None if v is None else v * 1e3 for v in itl], marker="o", label=name)
    ticks = sorted({n for levels in _levels(result).values() for n in levels})
    for ax, title in ((ax_tok, "aggregate output tok/s"), (ax_itl, "p95 inter-token latency (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(n) for n in ticks])
        ax.set_xlabel("concurrent clients")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    ax_tok.set_ylim(bottom=0)
    ax_itl.set_yscale("log")
    ax_tok.legend(fontsize=8)
    smoke = " (smoke run)" if result.get("smoke") else ""
    fig.suptitle(f"Serving SmolLM2-135M on {result['machine']['cpu_model']}{smoke}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def section(result: dict, png: str) -> str:
    """The REPORT.md section: method in one paragraph, plot, table, targets."""
    st = result["settings"]
    reqs = ", ".join(f"{n}: {r}" for n, r in st["requests_per_level"].items())
    method = (
        f"Each server runs alone on 127.0.0.1 and meets closed-loop load: N async HTTP clients "
        f"(httpx) streaming greedy chat completions (max_tokens {st['max_tokens']}, "
        f"`stream_options.include_usage`), at most {st['seconds_per_level']:.0f} s and "
        f"(clients: requests) {reqs} per level, after a warm-up; held-out chat prompts with every "
        f"1 in {st['long_every']} requests a long one ({', '.join(map(str, st['long_tokens']))} "
        "tokens). Output tok/s = completion tokens received / wall time of the level; ITL = gaps "
        "between content chunks of one stream, pooled; layers/token from Octomil's "
        "`usage.early_exit`. Cut = still streaming when the level's time ran out. Commands, "
        "versions and per-level load averages are in `results/serve.json`."
    )
    return (
        "## Serving many clients at once (`serve_bench.py`)\n\n"
        f"{method}\n\n![aggregate tok/s and p95 ITL vs clients]({png})\n\n" + render_table(result)
    )


def kept_section(markdown: str) -> str:
    """The serving section of an existing REPORT.md (with its markers), or ''."""
    start, end = markdown.find(BEGIN), markdown.find(END)
    return markdown[start : end + len(END)] + "\n" if 0 <= start < end else ""


def write_section(md_path: Path, text: str) -> None:
    """Put ``text`` between the markers in ``md_path``: in place, or appended."""
    old = md_path.read_text() if md_path.exists() else ""
    block = f"{BEGIN}\n{text}{END}\n"
    kept = kept_section(old)
    new = old.replace(kept, block) if kept else old.rstrip("\n") + ("\n\n" if old else "") + block
    md_path.write_text(new)


def main() -> None:
    import json

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("json", type=Path, nargs="?", default=DEFAULT_JSON)
    ap.add_argument(
        "--report", type=Path, help=f"also write the section into this file ({DEFAULT_REPORT.name})"
    )
    args = ap.parse_args()
    result = json.loads(args.json.read_text())
    png = args.json.with_suffix(".png")
    plot(result, png)
    print(render_table(result))
    if args.report:
        write_section(args.report, section(result, os.path.relpath(png, args.report.parent)))
        print(f"[serve-render] wrote the serving section of {args.report}")


if __name__ == "__main__":
    main()
