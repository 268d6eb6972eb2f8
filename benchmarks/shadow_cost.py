"""What a shadow check costs: decode time per token with every exit checked vs none.

One engine (embedded model, ``--exit-policy lens``, fast preset: tokens do exit), the same greedy
prompts decoded with ``shadow_rate`` 0 and 1.0, interleaved round by round so both see the same
machine load. A shadow check is one extra head row at the last layer (``engine.shadow``); the
alternative, a separate pass of the exited token through the layers it skipped, would cost
(30 - exit layer) layers plus the head. Writes ``benchmarks/results/shadow_cost.json``.
Run: ``.venv/bin/python benchmarks/shadow_cost.py`` (about a minute).
"""

import octomil  # noqa: F401, I001 - BLAS preload before mlx

import json
import statistics
import sys
import time
from pathlib import Path

from octomil.config import resolve_early_exit
from octomil.engine.engine import Engine
from octomil.engine.types import GenerationRequest, SamplingParams

sys.path.insert(0, str(Path(__file__).parent))
from engine_bench import cpu_model, git_commit  # noqa: E402

PROMPTS = ["Tell me about the moon.", "Name three fruits.", "Why is grass green?"]
TOKENS, ROUNDS = 32, 3


def run(engine: Engine, prompt: list[int], rate: float) -> tuple[float, int, int, int]:
    engine.shadow_rate = rate
    settings = resolve_early_exit(preset="fast")
    request = GenerationRequest(tuple(prompt), SamplingParams(max_tokens=TOKENS), settings)
    start = time.perf_counter()
    events = list(engine.generate(request))
    elapsed = time.perf_counter() - start
    exits = sum(e.exited_early for e in events)
    checked = sum(len(e.shadow) for e in events)
    return elapsed / len(events), exits, checked, sum(not a for e in events for _, a in e.shadow)


def main() -> None:
    engine = Engine.load(exit_policy="lens", early_exit=resolve_early_exit(preset="fast"))
    prompts = [engine.encode_chat([{"role": "user", "content": p}]) for p in PROMPTS]
    run(engine, prompts[0], 1.0)  # warm-up
    per = {0.0: [], 1.0: []}
    totals = {"exits": 0, "checked": 0, "disagreed": 0}
    for _ in range(ROUNDS):
        for p in prompts:
            for rate in (0.0, 1.0):
                ms, exits, checked, disagreed = run(engine, p, rate)
                per[rate].append(ms * 1000)
                if rate == 1.0:
                    totals["exits"] += exits
                    totals["checked"] += checked
                    totals["disagreed"] += disagreed
    off, on = statistics.median(per[0.0]), statistics.median(per[1.0])
    result = {
        "commit": git_commit(),
        "cpu": cpu_model(),
        "note": "machine shared with other engineers' tests; ratio from one interleaved run",
        "tokens_per_request": TOKENS,
        "rounds": ROUNDS,
        "ms_per_token_shadow_off": round(off, 2),
        "ms_per_token_shadow_all": round(on, 2),
        "ratio": round(on / off, 3),
        **totals,
    }
    out = Path(__file__).parent / "results" / "shadow_cost.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
