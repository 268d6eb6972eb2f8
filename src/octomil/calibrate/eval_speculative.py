"""``octomil eval --speculative MODE``: how faithful and how fast speculative decoding is, against
decoding the same prompts without speculation, in the same process.

Per prompt (chat template applied, greedy, EOS honoured), the two runs alternate in order so that
machine noise hits both alike. Figures, pooled over prompts and per category:

- ``exact_match``: fraction of prompts whose speculative output equals the plain output;
- ``token_agreement``: fraction of the plain output's positions where both runs hold the same
  token (greedy speculation is lossless, so anything below 1.0 is a bug);
- ``acceptance_rate``: accepted / drafted tokens; ``mean_accepted_per_step``: tokens a
  verification step yields (accepted drafts + the model's own token);
- ``speedup_vs_full_depth``: decode tok/s (tokens after the first / time from the first token to
  the last) with speculation over without; both runs at full depth, no early exit;
- ``cpu_speedup_vs_full_depth``: the same ratio in this process's CPU time
  (``time.process_time``), which other processes on a shared machine disturb less than the
  wall clock.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from octomil.engine.engine import Engine
from octomil.engine.speculation import SpeculativeSettings, SpeculativeStats
from octomil.engine.types import GenerationRequest, SamplingParams

OFF = SpeculativeSettings("off")


@dataclass
class SpecRun:
    tokens: list[int]
    decode_s: float
    spec: SpeculativeStats | None
    decode_cpu_s: float = 0.0  # process CPU time from the first token to the last


@dataclass
class SpecResult:
    category: str
    plain: SpecRun
    spec: SpecRun

    @property
    def agree(self) -> int:
        return sum(a == b for a, b in zip(self.plain.tokens, self.spec.tokens, strict=False))


def run(engine: Engine, ids: list[int], settings: SpeculativeSettings, max_tokens: int) -> SpecRun:
    gen = engine.generate(
        GenerationRequest(tuple(ids), SamplingParams(max_tokens=max_tokens), None, settings)
    )
    tokens, first_cpu = [], 0.0
    for e in gen:
        if not tokens:
            first_cpu = time.process_time()
        tokens.append(e.token_id)
    cpu = time.process_time() - first_cpu if tokens else 0.0
    return SpecRun(tokens, gen.stats.decode_time_s, gen.stats.speculative, cpu)


def summarize(results: list[SpecResult]) -> dict:
    def rate(runs: list[SpecRun], cpu: bool = False) -> float:
        n = sum(max(len(r.tokens) - 1, 0) for r in runs)
        t = sum(r.decode_cpu_s if cpu else r.decode_s for r in runs)
        return n / t if t > 0 else 0.0

    total = SpeculativeStats()
    for r in results:
        s = r.spec.spec
        if s is not None:
            total.drafts += s.drafts
            total.draft_tokens += s.draft_tokens
            total.accepted_tokens += s.accepted_tokens
    positions = sum(len(r.plain.tokens) for r in results)
    exact = sum(r.plain.tokens == r.spec.tokens for r in results)
    plain_tps, spec_tps = rate([r.plain for r in results]), rate([r.spec for r in results])
    plain_cpu = rate([r.plain for r in results], cpu=True)
    spec_cpu = rate([r.spec for r in results], cpu=True)
    return {
        "prompts": len(results),
        "positions": positions,
        "exact_match": round(exact / len(results), 4) if results else 0.0,
        "token_agreement": round(sum(r.agree for r in results) / max(positions, 1), 4),
        "acceptance_rate": round(total.acceptance_rate, 4),
        "mean_accepted_per_step": round(total.mean_accepted_per_step, 4),
        "drafts": total.drafts,
        "draft_tokens": total.draft_tokens,
        "accepted_tokens": total.accepted_tokens,
        "decode_tokens_per_s_full_depth": round(plain_tps, 2),
        "decode_tokens_per_s": round(spec_tps, 2),
        "speedup_vs_full_depth": round(spec_tps / plain_tps, 4) if plain_tps else 0.0,
        "cpu_speedup_vs_full_depth": round(spec_cpu / plain_cpu, 4) if plain_cpu else 0.0,
    }


def evaluate_speculative(
    engine: Engine,
    prompts: list[dict],
    settings: SpeculativeSettings,
    max_tokens: int,
    on_prompt: Callable[[int, SpecResult], None] | None = None,
) -> dict:
    """Run every prompt both ways; the overall summary with a ``per_category`` breakdown."""
    warm = engine.encode_chat([{"role": "user", "content": "Hello"}])
    run(engine, warm, OFF, 4)  # warm-up, not measured
    run(engine, warm, settings, 4)
    results = []
    for i, p in enumerate(prompts):
        ids = engine.encode_chat([{"role": "user", "content": p["prompt"]}])
        if i % 2:
            spec = run(engine, ids, settings, max_tokens)
            plain = run(engine, ids, OFF, max_tokens)
        else:
            plain = run(engine, ids, OFF, max_tokens)
            spec = run(engine, ids, settings, max_tokens)
        results.append(SpecResult(p["category"], plain, spec))
        if on_prompt is not None:
            on_prompt(i, results[-1])
    out = {"mode": settings.mode, "num_speculative_tokens": settings.num_tokens}
    out |= summarize(results)
    cats = sorted({r.category for r in results})
    out["per_category"] = {c: summarize([r for r in results if r.category == c]) for c in cats}
    return out
