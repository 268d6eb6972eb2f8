"""Structured outputs on the embedded model: validity, layers, mask cost and fast-forward share.

For each schema of ``prompts/structured_cases.json`` and each preset (full depth, quality,
balanced, fast; the engine's calibrated exit policy), one greedy chat generation with the
schema's grammar, in three variants of where the mask applies:

- ``masked`` (Octomil): at every exit check (entropy over the allowed tokens) and at the last
  layer;
- ``decision_unmasked``: the exit is decided on the unmasked distribution, the exited token is
  still drawn from the masked one (valid, but exits are decided on the wrong entropy);
- ``naive``: the mask applies at the last layer only, an exited token is the unmasked argmax
  (the classic failure: keys and punctuation exiting early and breaking the JSON).

Per variant and preset: the schema-valid rate (``json.loads`` + ``jsonschema``), the share of
tokens fast-forwarded (forced, no model pass), layers per model-decoded token, the grammar's cost
per token (mask + accept + forced-token computation, timed inside the engine) as a share of
decode time, and tokens/s against free text of the same length (full depth). Greedy and
one run per cell, on a machine shared with other jobs: ratios are within this run.
Bounded: ~3 min. Writes ``results/structured.json`` (``structured-lens.json`` with
``--exit-policy lens``: the calibrated policy places no exit check on this CPU, the raw head does).

    .venv/bin/python benchmarks/structured_bench.py
    .venv/bin/python benchmarks/structured_bench.py --exit-policy lens
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import time
from pathlib import Path

import jsonschema

from octomil.config import EarlyExitSettings, resolve_early_exit
from octomil.engine import constraint as constraint_mod
from octomil.engine import generation as generation_mod
from octomil.engine.constraint import GrammarSpec
from octomil.engine.engine import Engine
from octomil.engine.types import GenerationRequest, SamplingParams

HERE = Path(__file__).parent
CASES = HERE / "prompts" / "structured_cases.json"
PRESETS = ("full", "quality", "balanced", "fast")
VARIANTS = ("masked", "decision_unmasked", "naive")
MAX_TOKENS = 60


class GrammarClock:
    """Times the grammar's work per token (mask, accept, forced) by wrapping Constraint."""

    def __init__(self) -> None:
        self.seconds = 0.0
        cls = constraint_mod.Constraint
        self._originals = {name: getattr(cls, name) for name in ("mask", "accept", "forced")}
        for name, fn in self._originals.items():
            setattr(cls, name, self._timed(fn))

    def _timed(self, fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0

        return wrapper


def _variant(gen: generation_mod.Generation, variant: str) -> None:
    """Move the mask out of the exit decision (and, for naive, out of exited tokens)."""
    if variant == "masked":
        return
    next_input = gen.next_input
    select = gen.select

    def unmasked_input():
        token, policy, _ = next_input()
        return token, policy, None

    def naive_select(step):
        if step.exited:
            saved, gen._mask = gen._mask, None
            try:
                return select(step)
            finally:
                gen._mask = saved
        return select(step)

    gen.next_input = unmasked_input  # type: ignore[method-assign]
    if variant == "naive":
        gen.select = naive_select  # type: ignore[method-assign]


def _settings(preset: str) -> EarlyExitSettings:
    return EarlyExitSettings() if preset == "full" else resolve_early_exit(preset)


def run_one(engine: Engine, prompt: list[int], schema: dict | None, preset: str, variant: str):
    grammar = GrammarSpec("json_schema", schema) if schema is not None else None
    params = SamplingParams(max_tokens=MAX_TOKENS, grammar=grammar, ignore_eos=grammar is None)
    gen = engine.generate(GenerationRequest(tuple(prompt), params, _settings(preset)))
    _variant(gen, variant)
    t0 = time.perf_counter()
    text = "".join(e.text for e in gen)
    return text, gen.stats, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="default: results/structured[-POLICY].json")
    parser.add_argument(
        "--exit-policy",
        default=None,
        help="as `octomil serve --exit-policy` (default: the calibrated policy); 'lens' exits on "
        "the raw shared head, which the calibrated presets do not place checks for",
    )
    args = parser.parse_args()
    suffix = f"-{args.exit_policy}" if args.exit_policy else ""
    out = args.out or str(HERE / "results" / f"structured{suffix}.json")
    engine = Engine.load(None, exit_policy=args.exit_policy)
    clock = GrammarClock()
    cases = json.loads(CASES.read_text())["schemas"]
    prompts = {
        n: engine.encode_chat([{"role": "user", "content": c["prompt"]}]) for n, c in cases.items()
    }
    run_one(engine, prompts["enum"], cases["enum"]["schema"], "full", "masked")  # warm up

    cells = []
    for preset in PRESETS:
        for variant in VARIANTS if preset != "full" else ("masked",):
            valid = forced = tokens = model_tokens = layers = 0
            seconds = grammar_s = 0.0
            failures = []
            for name, case in cases.items():
                clock.seconds = 0.0
                text, stats, elapsed = run_one(
                    engine, prompts[name], case["schema"], preset, variant
                )
                grammar_s += clock.seconds
                seconds += elapsed
                tokens += stats.completion_tokens
                forced += stats.forced_tokens
                model_tokens += len(stats.layers_used)
                layers += sum(stats.layers_used)
                try:
                    jsonschema.validate(json.loads(text), case["schema"])
                    valid += stats.finish_reason == "stop"
                except (json.JSONDecodeError, jsonschema.ValidationError):
                    failures.append({"schema": name, "text": text[:80]})
            cells.append(
                {
                    "preset": preset,
                    "variant": variant,
                    "schema_valid": f"{valid}/{len(cases)}",
                    "forced_share": round(forced / tokens, 3),
                    "avg_layers_per_model_token": round(layers / model_tokens, 2),
                    "grammar_ms_per_token": round(1000 * grammar_s / tokens, 3),
                    "grammar_share_of_time": round(grammar_s / seconds, 4),
                    "tokens_per_s": round(tokens / seconds, 2),
                    "failures": failures,
                }
            )
            print(json.dumps(cells[-1]))
    free = []
    for name in cases:
        _, stats, elapsed = run_one(engine, prompts[name], None, "full", "masked")
        free.append((stats.completion_tokens, elapsed))
    free_tps = sum(t for t, _ in free) / sum(s for _, s in free)
    result = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared with other jobs)",
        "load_avg": os.getloadavg(),
        "exit_policy": engine.exit_choice.status,
        "max_tokens": MAX_TOKENS,
        "free_text_tokens_per_s_full_depth": round(free_tps, 2),
        "cells": cells,
    }
    Path(out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "cells"}, indent=2))


if __name__ == "__main__":
    main()
