"""Continuous batching (``engine.scheduler``): a request's tokens do not depend on its neighbours.

Reference: the same request served alone (iterating its Generation). Requests join at different
steps, have prompts of different lengths (some cut into several prefill chunks), different
sampling parameters and lengths, and leave (finish or are cancelled) while others decode.
"""

import pytest
from tiny_models import SUPPORTED, UNSUPPORTED, make_tiny_model, sharpen, tiny_engine

from octomil.config import EarlyExitSettings
from octomil.engine.errors import PromptTooLongError
from octomil.engine.scheduler import Scheduler, SchedulerConfig
from octomil.engine.types import GenerationRequest, SamplingParams

EXIT_ON = EarlyExitSettings(threshold=1.0, min_layers_fraction=0.25)
CHUNK = 8  # small prefill chunks so that prompts take several steps


def _prompt(seed: int, length: int) -> tuple[int, ...]:
    return tuple((seed * 7919 + i * 104729) % 250 + 3 for i in range(length))


# (prompt length, sampling, step at which the request arrives)
REQUESTS = [
    (5, SamplingParams(max_tokens=12), 0),
    (21, SamplingParams(max_tokens=7, temperature=0.8, top_p=0.9, seed=11), 0),
    (1, SamplingParams(max_tokens=9, temperature=1.2, top_k=20, seed=3), 2),
    (30, SamplingParams(max_tokens=10, logprobs=2), 3),
    (9, SamplingParams(max_tokens=6, repetition_penalty=1.3), 5),
    (14, SamplingParams(max_tokens=11, temperature=0.7, seed=5), 6),
]


def _requests(early_exit=None):
    return [
        GenerationRequest(_prompt(i, n), params, early_exit=early_exit)
        for i, (n, params, _) in enumerate(REQUESTS)
    ]


def _alone(engine, request):
    return [(e.token_id, e.layers_used, e.text) for e in engine.generate(request)]


def _together(engine, requests, arrivals, config, cancel=None):
    """Serve ``requests`` through one scheduler; ``cancel``: (index, after n tokens)."""
    scheduler = Scheduler(config)
    gens = [engine.generate(r) for r in requests]
    got: dict[int, list] = {i: [] for i in range(len(gens))}
    index = {id(g): i for i, g in enumerate(gens)}
    step = 0
    while step == 0 or not scheduler.idle or step <= max(arrivals):
        for i, at in enumerate(arrivals):
            if at == step:
                scheduler.submit(gens[i])
        out = scheduler.step()
        for gen, event in out.events:
            i = index[id(gen)]
            if gen.cancelled:
                continue  # a consumer that cancelled reads nothing more
            got[i].append((event.token_id, event.layers_used, event.text))
            if cancel and i == cancel[0] and len(got[i]) == cancel[1]:
                gen.cancel()
        step += 1
        assert step < 500, "scheduler did not finish"
    return got, gens


@pytest.mark.parametrize("variant", [*SUPPORTED, "llama-sliding", UNSUPPORTED])
@pytest.mark.parametrize("max_batch", [2, 4, 8])
def test_batched_requests_match_each_alone(variant, max_batch, byte_tokenizer):
    engine = tiny_engine(make_tiny_model(variant), byte_tokenizer)
    engine.prefill_chunk = CHUNK
    requests = _requests()
    arrivals = [at for *_, at in REQUESTS]
    got, gens = _together(engine, requests, arrivals, SchedulerConfig(max_batch_size=max_batch))
    for i, request in enumerate(requests):
        assert got[i] == _alone(engine, request), f"request {i}"
        assert gens[i].stats.completion_tokens == len(got[i])


@pytest.mark.parametrize("variant", ["llama", "qwen2-untied", "gemma2", "llama-sliding"])
def test_batched_early_exits_match_each_alone(variant, byte_tokenizer):
    """Per-row exits: each row leaves at its own depth; its catch-up row joins its next step."""
    engine = tiny_engine(sharpen(make_tiny_model(variant)), byte_tokenizer, early_exit=EXIT_ON)
    engine.prefill_chunk = CHUNK
    requests = _requests()
    arrivals = [at for *_, at in REQUESTS]
    got, gens = _together(engine, requests, arrivals, SchedulerConfig(max_batch_size=4))
    assert sum(g.stats.early_exit_tokens for g in gens) > 0
    for i, request in enumerate(requests):
        assert got[i] == _alone(engine, request), f"request {i}"


def test_cancelled_neighbour_leaves_others_unchanged(byte_tokenizer):
    engine = tiny_engine(make_tiny_model("llama"), byte_tokenizer)
    engine.prefill_chunk = CHUNK
    requests = _requests()
    arrivals = [0] * len(requests)
    got, gens = _together(
        engine, requests, arrivals, SchedulerConfig(max_batch_size=4), cancel=(0, 3)
    )
    assert gens[0].stats.finish_reason == "cancelled" and len(got[0]) == 3
    for i in range(1, len(requests)):
        assert got[i] == _alone(engine, requests[i]), f"request {i}"


def test_cancel_between_prefill_chunks_stops_prefill(byte_tokenizer):
    """Regression: a request cancelled while its prompt is read must not finish its prefill."""
    engine = tiny_engine(make_tiny_model("llama"), byte_tokenizer)
    engine.prefill_chunk = CHUNK
    scheduler = Scheduler()
    gen = engine.generate(GenerationRequest(_prompt(1, 6 * CHUNK), SamplingParams(max_tokens=4)))
    scheduler.submit(gen)
    out = scheduler.step()
    assert out.prefill_tokens == CHUNK
    gen.cancel()
    out = scheduler.step()
    assert out.finished == [gen] and out.prefill_tokens == 0
    assert gen.stats.finish_reason == "cancelled" and gen.loop.position == CHUNK
    assert scheduler.idle and scheduler.kv_tokens_reserved == 0


def test_long_prompt_prefill_interleaves_with_decoding(byte_tokenizer):
    """Regression: a long prompt is read one chunk per step while running streams decode."""
    engine = tiny_engine(make_tiny_model("llama"), byte_tokenizer)
    engine.prefill_chunk = CHUNK
    scheduler = Scheduler()
    short = engine.generate(GenerationRequest(_prompt(2, 4), SamplingParams(max_tokens=20)))
    long = engine.generate(GenerationRequest(_prompt(3, 10 * CHUNK), SamplingParams(max_tokens=2)))
    scheduler.submit(short)
    scheduler.step()
    scheduler.submit(long)
    for _ in range(9):
        out = scheduler.step()
        assert out.prefill_tokens == CHUNK  # one chunk a step ...
        assert [g for g, _ in out.events] == [short]  # ... and the short stream keeps flowing


def test_short_prompt_is_not_stuck_behind_a_long_prefill(byte_tokenizer):
    """Prefill chunks go round robin: a short prompt arriving behind a long one starts soon."""
    engine = tiny_engine(make_tiny_model("llama"), byte_tokenizer)
    engine.prefill_chunk = CHUNK
    scheduler = Scheduler()
    long = engine.generate(GenerationRequest(_prompt(3, 40 * CHUNK), SamplingParams(max_tokens=2)))
    short = engine.generate(GenerationRequest(_prompt(2, 2 * CHUNK), SamplingParams(max_tokens=3)))
    scheduler.submit(long)
    scheduler.step()
    scheduler.submit(short)
    steps = 0
    while not short.finished:
        scheduler.step()
        steps += 1
    assert steps <= 2 * 2 + 3 + 1  # its 2 chunks alternate with the long prompt's, then 3 tokens
    assert long.prefill_remaining > 0


def test_kv_budget_queues_requests_that_do_not_fit_yet(byte_tokenizer):
    engine = tiny_engine(make_tiny_model("llama"), byte_tokenizer)
    scheduler = Scheduler(SchedulerConfig(max_kv_tokens=40))
    a = engine.generate(GenerationRequest(_prompt(1, 10), SamplingParams(max_tokens=20)))
    b = engine.generate(GenerationRequest(_prompt(2, 10), SamplingParams(max_tokens=20)))
    scheduler.submit(a)
    scheduler.submit(b)
    scheduler.step()
    assert scheduler.kv_tokens_reserved == 30 and scheduler.running == 1
    while not a.finished:
        scheduler.step()
    scheduler.step()
    assert scheduler.kv_tokens_reserved == 30 and scheduler.running == 1  # b admitted after a
    too_big = engine.generate(GenerationRequest(_prompt(3, 30), SamplingParams(max_tokens=20)))
    with pytest.raises(PromptTooLongError):
        scheduler.submit(too_big)


def test_batch_exit_rule_leaves_only_when_every_row_is_confident(byte_tokenizer):
    """The seed paper's rule: a row confident at a depth waits for its neighbours there."""
    engine = tiny_engine(sharpen(make_tiny_model("llama")), byte_tokenizer, early_exit=EXIT_ON)
    scheduler = Scheduler(SchedulerConfig(max_batch_size=4, exit_rule="batch"))
    gens = [engine.generate(r) for r in _requests()[:4]]
    for g in gens:
        scheduler.submit(g)
    exits = 0
    while not scheduler.idle:
        out = scheduler.step()
        depths = {event.layers_used for _, event in out.events}
        assert len(depths) <= 1, depths  # every row of a step leaves at the same depth
        exits += sum(event.exited_early for _, event in out.events)
    assert exits > 0


def test_unknown_exit_rule_is_refused():
    with pytest.raises(ValueError, match="exit_rule"):
        SchedulerConfig(exit_rule="fastest")


def test_more_rows_than_one_product_takes_stay_exact(byte_tokenizer, monkeypatch):
    """16 sequences with catch-up rows exceed the rows kernel's 32 rows: the layer runs in several
    products of whole sequences, so each still gets the tokens it gets alone."""
    from octomil.blas import route
    from octomil.engine import ragged

    widest = {"step": 0, "product": 0}
    run_layer, attention = ragged.run_layer, ragged._RaggedAttention.__call__

    def spy_run_layer(layer, h, segments, max_rows=0):
        widest["step"] = max(widest["step"], h.shape[1])
        return run_layer(layer, h, segments, max_rows)

    def spy_attention(self, x, mask=None, cache=None):
        widest["product"] = max(widest["product"], x.shape[1])
        return attention(self, x, mask, cache)

    monkeypatch.setattr("octomil.engine.layer_loop.run_layer", spy_run_layer)
    monkeypatch.setattr(ragged._RaggedAttention, "__call__", spy_attention)
    engine = tiny_engine(sharpen(make_tiny_model("llama")), byte_tokenizer, early_exit=EXIT_ON)
    requests = [
        GenerationRequest(_prompt(i, 3 + i % 5), SamplingParams(max_tokens=10), early_exit=EXIT_ON)
        for i in range(16)
    ]
    got, gens = _together(engine, requests, [0] * 16, SchedulerConfig(max_batch_size=16))
    assert sum(g.stats.early_exit_tokens for g in gens) > 16
    assert widest["step"] > route.max_rows() >= widest["product"] > 0
    for i, request in enumerate(requests):
        assert got[i] == _alone(engine, request), f"request {i}"


def test_row_groups_keep_sequences_whole():
    from octomil.engine.ragged import Segment, row_groups

    sizes = [5, 5, 1, 3, 5, 5, 2]
    segments, start = [], 0
    for n in sizes:
        segments.append(Segment(start, start + n, None, None))
        start += n
    groups = row_groups(segments, 8)
    assert [[s.stop - s.start for s in g] for g in groups] == [[5], [5, 1], [3, 5], [5, 2]]


def test_an_ended_request_frees_its_kv_cache_while_still_referenced(byte_tokenizer):
    """Regression: a finished or cancelled Generation still held (in a server, by an exception's
    traceback in a reference cycle) kept its KV arrays alive until Python's cyclic collector ran."""
    import gc

    import mlx.core as mx

    engine = tiny_engine(make_tiny_model("llama"), byte_tokenizer)
    engine.prefill_chunk = CHUNK
    scheduler = Scheduler()
    warm = engine.generate(GenerationRequest(_prompt(3, 3 * CHUNK), SamplingParams(max_tokens=5)))
    scheduler.submit(warm)
    while not scheduler.idle:  # the engine's own lazily built arrays exist from here on
        scheduler.step()
    del warm
    gc.collect()
    before = mx.get_active_memory()
    done = engine.generate(GenerationRequest(_prompt(1, 3 * CHUNK), SamplingParams(max_tokens=5)))
    dropped = engine.generate(
        GenerationRequest(_prompt(2, 3 * CHUNK), SamplingParams(max_tokens=50))
    )
    for gen in (done, dropped):
        scheduler.submit(gen)
    scheduler.step()
    kv = sum(
        a.nbytes
        for gen in (done, dropped)
        for c in gen.loop.cache
        for a in c.state
        if isinstance(a, mx.array)
    )
    while not done.finished:
        scheduler.step()
    dropped.cancel()
    while not scheduler.idle:
        scheduler.step()
    assert done.stats.finish_reason == "length" and dropped.stats.finish_reason == "cancelled"
    assert done.loop.cache == [] and dropped.loop.cache == []
    assert done.loop.position == 3 * CHUNK + 4  # the bookkeeping stays
    # Freed: what is left over is a few small arrays (sampler keys), not the caches.
    assert mx.get_active_memory() - before < kv / 4, (mx.get_active_memory(), before, kv)
