"""Structured outputs with speculative decoding: JSON-schema extraction with ``lookup`` vs without.

Extraction answers copy spans of their prompt (names, titles, addresses, quotes), which is where
prompt lookup drafts pay; under a grammar the drafts are cut where the schema forbids them and
every verification row is masked (``octomil.engine.guided_drafts``). Six extraction prompts
(``prompts/structured_spec_cases.json``), greedy, ``--max-tokens`` at most, ``--repeats`` rounds;
per prompt and round the run without speculation and the run with ``lookup`` alternate in order,
so the ratios are measured under the same machine load. Per mode: decode tok/s (completion tokens
over the time from the first to the last token, forced tokens included in both modes), completion
tokens per CPU second of the whole request (``time.process_time``, less sensitive to other jobs),
acceptance, tokens per verification, schema-valid outputs and whether both modes gave the same
tokens.

Writes ``results/structured-spec.json`` and ``structured-spec.png``. ~2 min on 2 busy cores:

    .venv/bin/python benchmarks/structured_spec_bench.py
"""

import octomil  # noqa: F401, I001 - BLAS preload before mlx

import argparse
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path

import jsonschema

from octomil.config import EarlyExitSettings, resolve_early_exit
from octomil.engine.constraint import GrammarSpec
from octomil.engine.engine import Engine
from octomil.engine.speculation import SpeculativeSettings
from octomil.engine.types import GenerationRequest, SamplingParams

sys.path.insert(0, str(Path(__file__).parent))
from engine_bench import cpu_model, git_commit  # noqa: E402

HERE = Path(__file__).parent
CASES = HERE / "prompts" / "structured_spec_cases.json"
RESULTS = HERE / "results"
MODES = ("off", "lookup")


def run_one(engine: Engine, prompt: list[int], schema: dict, mode: str, args) -> dict:
    params = SamplingParams(max_tokens=args.max_tokens, grammar=GrammarSpec("json_schema", schema))
    exits = EarlyExitSettings() if args.preset == "full" else resolve_early_exit(args.preset)
    spec = SpeculativeSettings(mode, args.num_speculative_tokens)
    gen = engine.generate(GenerationRequest(tuple(prompt), params, exits, spec))
    cpu = time.process_time()
    tokens = [e.token_id for e in gen]
    cpu = time.process_time() - cpu
    text = engine.loaded.tokenizer.decode(tokens)
    try:
        jsonschema.validate(json.loads(text), schema)
        valid = gen.stats.finish_reason == "stop"
    except (json.JSONDecodeError, jsonschema.ValidationError):
        valid = False
    s = gen.stats
    return {
        "tokens": tokens,
        "text": text,
        "valid": valid,
        "completion_tokens": s.completion_tokens,
        "forced_tokens": s.forced_tokens,
        "decode_s": s.decode_time_s,
        "cpu_s": cpu,
        "spec": s.speculative.as_dict() if s.speculative is not None else None,
    }


def summarize(runs: list[dict]) -> dict:
    tokens = sum(r["completion_tokens"] for r in runs)
    out = {
        "completion_tokens": tokens,
        "forced_tokens": sum(r["forced_tokens"] for r in runs),
        "decode_tokens_per_s": round(tokens / sum(r["decode_s"] for r in runs), 2),
        "tokens_per_cpu_s": round(tokens / sum(r["cpu_s"] for r in runs), 2),
        "schema_valid": f"{sum(r['valid'] for r in runs)}/{len(runs)}",
    }
    specs = [r["spec"] for r in runs if r["spec"] is not None]
    if specs:
        drafts = sum(s["drafts"] for s in specs)
        drafted = sum(s["draft_tokens"] for s in specs)
        accepted = sum(s["accepted_tokens"] for s in specs)
        out |= {
            "drafts": drafts,
            "draft_tokens": drafted,
            "accepted_tokens": accepted,
            "acceptance_rate": round(accepted / drafted, 3) if drafted else 0.0,
            "tokens_per_verification": round(1 + accepted / drafts, 2) if drafts else 0.0,
        }
    return out


def render(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(data["per_prompt"])
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.4
    for k, mode in enumerate(MODES):
        vals = [data["per_prompt"][n][mode]["decode_tokens_per_s"] for n in names]
        bars = ax.bar([i + k * width for i in range(len(names))], vals, width, label=mode)
        if mode == "lookup":
            rates = [data["per_prompt"][n][mode]["acceptance_rate"] for n in names]
            ax.bar_label(bars, [f"{r:.0%}" for r in rates], fontsize=8)
    ax.set_xticks([i + width / 2 for i in range(len(names))], names)
    ax.set_ylabel("decode tok/s (labels: draft acceptance)")
    total = data["total"]
    ratio = total["lookup"]["decode_tokens_per_s"] / total["off"]["decode_tokens_per_s"]
    ax.set_title(
        f"JSON-schema extraction, lookup vs none ({data['preset']}): {ratio:.2f}x, same tokens"
        if data["identical_tokens"]
        else f"JSON-schema extraction, lookup vs none ({data['preset']}): {ratio:.2f}x"
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--num-speculative-tokens", type=int, default=8)
    ap.add_argument("--preset", default="full", help="full, quality, balanced or fast")
    ap.add_argument("--exit-policy", default=None, help="as `octomil serve --exit-policy`")
    args = ap.parse_args()
    engine = Engine.load(None, exit_policy=args.exit_policy)
    cases = json.loads(CASES.read_text())
    prompts = {
        n: engine.encode_chat([{"role": "user", "content": c["prompt"]}]) for n, c in cases.items()
    }
    first = next(iter(cases))
    for mode in MODES:  # warm-up, not measured
        run_one(engine, prompts[first], cases[first]["schema"], mode, args)
    runs: dict[str, dict[str, list[dict]]] = {n: {m: [] for m in MODES} for n in cases}
    for round_ in range(args.repeats):
        for i, (name, case) in enumerate(cases.items()):
            order = MODES if (i + round_) % 2 == 0 else MODES[::-1]
            for mode in order:
                runs[name][mode].append(run_one(engine, prompts[name], case["schema"], mode, args))
            print(f"round {round_ + 1} {name}", file=sys.stderr, flush=True)
    identical = all(
        a["tokens"] == b["tokens"]
        for r in runs.values()
        for a, b in zip(r["off"], r["lookup"], strict=True)
    )
    data = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "model": engine.model_id,
        "cpu": cpu_model(),
        "commit": git_commit(),
        "load_avg_at_end": [round(x, 2) for x in os.getloadavg()],
        "note": "2 shared cores (other engineers' jobs running); ratios measured in one run",
        "preset": args.preset,
        "exit_policy": engine.exit_choice.status,
        "max_tokens": args.max_tokens,
        "num_speculative_tokens": args.num_speculative_tokens,
        "repeats": args.repeats,
        "identical_tokens": identical,
        "total": {m: summarize([x for r in runs.values() for x in r[m]]) for m in MODES},
        "per_prompt": {n: {m: summarize(r[m]) for m in MODES} for n, r in runs.items()},
        "outputs": {n: r["off"][0]["text"] for n, r in runs.items()},
    }
    total = data["total"]
    for key in ("decode_tokens_per_s", "tokens_per_cpu_s"):
        data[f"lookup_over_off_{key}"] = round(total["lookup"][key] / total["off"][key], 3)
    RESULTS.mkdir(exist_ok=True)
    suffix = "" if args.preset == "full" else f"-{args.preset}"
    out = RESULTS / f"structured-spec{suffix}.json"
    out.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    render(data, RESULTS / f"structured-spec{suffix}.png")
    print(json.dumps({k: v for k, v in data.items() if k not in ("per_prompt", "outputs")}))


if __name__ == "__main__":
    main()
