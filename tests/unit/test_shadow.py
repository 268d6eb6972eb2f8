"""Shadow checks: exact counterfactuals from catch-up rows, and no change to any output."""

from __future__ import annotations

import mlx.core as mx
from tiny_models import make_tiny_model, sharpen, tiny_engine

from octomil.config import EarlyExitSettings
from octomil.engine.scheduler import Scheduler, SchedulerConfig
from octomil.engine.types import GenerationRequest, SamplingParams

EXIT_ON = EarlyExitSettings(threshold=1.0, min_layers_fraction=0.25)
PROMPTS = [(5, 9, 13, 17), (40, 41, 42), (7,) * 6]


def _serve(engine, rate: float):
    """Serve PROMPTS together (greedy); every event per request."""
    engine.shadow_rate = rate
    scheduler = Scheduler(SchedulerConfig(max_batch_size=4))
    gens = [
        engine.generate(GenerationRequest(p, SamplingParams(max_tokens=16), EXIT_ON))
        for p in PROMPTS
    ]
    for g in gens:
        scheduler.submit(g)
    events: dict[int, list] = {id(g): [] for g in gens}
    while not scheduler.idle:
        for gen, event in scheduler.step().events:
            events[id(gen)].append(event)
    return [events[id(g)] for g in gens]


def test_shadow_checks_change_no_token_and_match_a_full_depth_forward(byte_tokenizer) -> None:
    engine = tiny_engine(sharpen(make_tiny_model("llama")), byte_tokenizer, early_exit=EXIT_ON)
    plain = _serve(engine, 0.0)
    shadowed = _serve(engine, 1.0)
    strip = lambda evs: [(e.token_id, e.layers_used, e.text, e.finish_reason) for e in evs]  # noqa: E731
    assert [strip(e) for e in shadowed] == [strip(e) for e in plain]
    assert all(not e.shadow for evs in plain for e in evs)
    reference = sharpen(make_tiny_model("llama"))
    checked = 0
    for prompt, evs in zip(PROMPTS, shadowed, strict=True):
        tokens = [e.token_id for e in evs]
        full = reference(mx.array([list(prompt) + tokens]))[0]  # (L, vocab)
        exits = [(k, e.layers_used) for k, e in enumerate(evs) if e.exited_early]
        results = [r for e in evs for r in e.shadow]
        # Every exit is checked once its row reached the last layer: all but trailing ones.
        assert results and len(exits) - len(results) in (0, 1)
        for (k, layer), (got_layer, agreed) in zip(exits, results, strict=False):
            full_token = int(mx.argmax(full[len(prompt) - 1 + k]).item())
            assert (got_layer, agreed) == (layer, tokens[k] == full_token)
        checked += len(results)
    assert checked > 0


def test_shadow_rate_checks_that_share_of_exits(byte_tokenizer) -> None:
    """Rate 0.5 checks exactly every second exit of each sequence."""
    engine = tiny_engine(sharpen(make_tiny_model("llama")), byte_tokenizer, early_exit=EXIT_ON)
    every = [[r for e in evs for r in e.shadow] for evs in _serve(engine, 1.0)]
    half = [[r for e in evs for r in e.shadow] for evs in _serve(engine, 0.5)]
    assert sum(map(len, every)) >= 4
    assert half == [results[1::2] for results in every]


def test_observe_mode_serves_full_depth_and_still_checks(byte_tokenizer) -> None:
    """The drift fallback's mode: exits are decided, never taken; would-be exits are checked."""
    engine = tiny_engine(sharpen(make_tiny_model("llama")), byte_tokenizer, early_exit=EXIT_ON)
    engine.shadow_rate = 1.0
    observe = EarlyExitSettings(1.0, 0.25, observe=True)
    params = SamplingParams(max_tokens=16)
    for prompt in PROMPTS:
        full = list(engine.generate(GenerationRequest(prompt, params, EarlyExitSettings())))
        seen = list(engine.generate(GenerationRequest(prompt, params, observe)))
        assert [e.token_id for e in seen] == [e.token_id for e in full]
        assert all(e.layers_used == engine.total_layers and not e.exited_early for e in seen)
        # Every token would have exited (threshold 1.0): each is checked, in the same step.
        results = [r for e in seen for r in e.shadow]
        assert len(results) >= len(seen) - 1
        assert {layer for layer, _ in results} <= set(engine.policy_for(EXIT_ON).exit_layers)
