"""``octomil eval``: how faithful and how fast an early-exit setting is, against full depth.

Per prompt (chat template applied, greedy, EOS honoured), in the same process and interleaved:

- full depth and the setting each generate freely; decode tok/s is (tokens - 1) / time from the
  first token to the last (prefill excluded), pooled over prompts; the order of the two runs
  alternates per prompt so machine noise hits both alike;
- token agreement is *teacher-forced*: at every decode position the setting's emitted top-1 is
  compared with the full-depth token given the same (full-depth) prefix. Up to the first
  divergence the free run already saw that prefix; from there the engine's own ``LayerLoop`` is
  fed the full-depth tokens (deferred catch-up keeps its cache exactly the full-depth one);
- exact match: the free-running sequence equals the full-depth one;
- average layers used and early-exit share, of the free-running tokens.

The first token comes from the full-depth prefill in both runs and is excluded from agreement and
layer statistics.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx

from octomil.engine.engine import Engine
from octomil.engine.exit_policy import ExitPolicy
from octomil.engine.generation import Generation
from octomil.engine.layer_loop import LayerLoop
from octomil.engine.types import SamplingParams


class PromptFileError(ValueError):
    """The prompt file cannot be read; one line."""


def load_prompts(path: str | Path, limit: int | None = None) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise PromptFileError(f"prompt file {path} does not exist")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PromptFileError(f"{path}:{n}: not JSON ({exc.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise PromptFileError(f'{path}:{n}: expected {{"prompt": "...", "category": "..."}}')
        rows.append({"prompt": row["prompt"], "category": str(row.get("category", "all"))})
    if not rows:
        raise PromptFileError(f"{path} has no prompts")
    return rows[:limit] if limit else rows


@dataclass
class Run:
    tokens: list[int]
    layers: list[int]  # per decoded token (first token excluded)
    exits: int
    decode_s: float


@dataclass
class PromptResult:
    category: str
    full: Run
    early: Run
    agree: int = 0
    positions: int = 0
    forced_layers: list[int] = field(default_factory=list)

    @property
    def exact(self) -> bool:
        return self.full.tokens == self.early.tokens


def free_run(engine: Engine, ids: list[int], policy: ExitPolicy | None, max_tokens: int) -> Run:
    assert engine.loaded.anatomy is not None
    gen = Generation(
        LayerLoop(engine.loaded.anatomy, engine.loaded.model),
        ids,
        SamplingParams(max_tokens=max_tokens),
        policy,
        engine.tokenizer,
        engine.loaded.eos_token_ids,
        engine._vocab_size,
    )
    events = list(gen)
    s = gen.stats
    return Run(
        [e.token_id for e in events],
        [e.layers_used for e in events[1:]],
        sum(e.exited_early for e in events[1:]),
        s.decode_time_s,
    )


def teacher_forced(
    engine: Engine, ids: list[int], full: Run, early: Run, policy: ExitPolicy | None
):
    """(agreeing positions, positions, layers per position) over full.tokens[1:]."""
    ref = full.tokens
    n = len(ref) - 1  # positions decoded after the prefill's token
    if n <= 0:
        return 0, 0, []
    # Identical prefixes: the free run's choices there are the teacher-forced ones.
    k = 0
    while k < n and k + 1 < len(early.tokens) and early.tokens[k + 1] == ref[k + 1]:
        k += 1
    agree, layers = k, list(early.layers[:k])
    if k < n:
        assert engine.loaded.anatomy is not None
        loop = LayerLoop(engine.loaded.anatomy, engine.loaded.model)
        loop.prefill(ids + ref[:k])
        for pos in range(k, n):
            step = loop.decode(ref[pos], policy)
            agree += int(int(mx.argmax(step.logits, axis=-1).item()) == ref[pos + 1])
            layers.append(step.depth)
    return agree, n, layers


def evaluate_prompt(
    engine: Engine,
    prompt: dict,
    policy: ExitPolicy | None,
    max_tokens: int,
    early_first: bool,
    full: Run | None = None,
) -> PromptResult:
    ids = engine.encode_chat([{"role": "user", "content": prompt["prompt"]}])
    if early_first:
        early = free_run(engine, ids, policy, max_tokens)
        full = full or free_run(engine, ids, None, max_tokens)
    else:
        full = full or free_run(engine, ids, None, max_tokens)
        early = free_run(engine, ids, policy, max_tokens)
    res = PromptResult(prompt["category"], full, early)
    res.agree, res.positions, res.forced_layers = teacher_forced(engine, ids, full, early, policy)
    return res


def summarize(results: list[PromptResult], total_layers: int) -> dict:
    def rate(runs: list[Run]) -> float:
        n = sum(max(len(r.tokens) - 1, 0) for r in runs)
        t = sum(r.decode_s for r in runs)
        return n / t if t > 0 else 0.0

    layers = [d for r in results for d in r.early.layers]
    positions = sum(r.positions for r in results)
    full_tps, early_tps = rate([r.full for r in results]), rate([r.early for r in results])
    forced = [d for r in results for d in r.forced_layers]
    return {
        "prompts": len(results),
        "positions": positions,
        "token_agreement": round(sum(r.agree for r in results) / positions, 4)
        if positions
        else 1.0,
        "exact_match": round(sum(r.exact for r in results) / len(results), 4) if results else 0.0,
        "avg_layers_used": round(sum(layers) / len(layers), 3) if layers else float(total_layers),
        "avg_layers_teacher_forced": round(sum(forced) / len(forced), 3)
        if forced
        else float(total_layers),
        "total_layers": total_layers,
        "early_exit_share": round(sum(r.early.exits for r in results) / len(layers), 4)
        if layers
        else 0.0,
        "decode_tokens_per_s_full_depth": round(full_tps, 2),
        "decode_tokens_per_s": round(early_tps, 2),
        "speedup_vs_full_depth": round(early_tps / full_tps, 4) if full_tps else 0.0,
    }


def evaluate(
    engine: Engine,
    prompts: list[dict],
    policy: ExitPolicy | None,
    max_tokens: int,
    on_prompt: Callable[[int, PromptResult], None] | None = None,
) -> dict:
    """Run every prompt; return the overall summary with a ``per_category`` breakdown."""
    # Warm-up (first calls compile kernels and fill allocator caches), not measured.
    warm = engine.encode_chat([{"role": "user", "content": "Hello"}])
    free_run(engine, warm, None, 4)
    free_run(engine, warm, policy, 4)
    results = []
    for i, p in enumerate(prompts):
        results.append(evaluate_prompt(engine, p, policy, max_tokens, early_first=i % 2 == 1))
        if on_prompt is not None:
            on_prompt(i, results[-1])
    out = summarize(results, engine.total_layers)
    cats = sorted({r.category for r in results})
    out["per_category"] = {
        c: summarize([r for r in results if r.category == c], engine.total_layers) for c in cats
    }
    return out
