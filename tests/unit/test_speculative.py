"""Speculative decoding (``engine.verify``, ``engine.lookup``, ``engine.speculation``): verification
rows give the numbers of one-row decode steps, rejected drafts leave no trace in the cache, and a
speculating request emits exactly the tokens it emits without speculation (greedy), alone and
batched with neighbours, including EOS, stop strings and max_tokens inside an accepted draft."""

import sys
from pathlib import Path

import mlx.core as mx
import pytest
from tiny_models import SUPPORTED, UNSUPPORTED, make_byte_tokenizer, make_tiny_model, tiny_engine

from octomil.engine.layer_loop import FullDepthLoop, LayerLoop
from octomil.engine.lookup import LookupDrafter
from octomil.engine.speculation import SpeculativeSettings
from octomil.engine.types import GenerationRequest, SamplingParams
from octomil.engine.verify import can_speculate, rollback

LOOKUP = SpeculativeSettings("lookup", num_tokens=6)
sys.path.insert(0, str(Path(__file__).parents[1]))
from speculation_check import batched_and_alone  # noqa: E402

OFF = SpeculativeSettings("off")
# A prompt that repeats itself: random tiny models copy it, so lookup drafts get accepted.
REPEAT = tuple([5, 9, 11, 40, 50, 61, 7, 8] * 3)


@pytest.fixture(scope="module")
def tokenizer():
    return make_byte_tokenizer()


@pytest.fixture(scope="module")
def engines(tokenizer):
    return {f: tiny_engine(make_tiny_model(f), tokenizer) for f in (*SUPPORTED, UNSUPPORTED)}


def _loop(engine):
    model, anatomy = engine.loaded.model, engine.loaded.anatomy
    return LayerLoop(anatomy, model) if anatomy is not None else FullDepthLoop(model)


@pytest.mark.parametrize("family", [*SUPPORTED, UNSUPPORTED])
def test_verification_rows_equal_one_row_steps(engines, family):
    engine = engines[family]
    prompt, tokens = list(range(3, 30)), [5, 9, 11, 40, 50, 61]
    alone = _loop(engine)
    alone.prefill(prompt)
    steps = mx.concatenate([alone.decode(t, None).logits for t in tokens], axis=0)
    rows = _loop(engine)
    rows.prefill(prompt)
    verified = rows.decode(tokens, None).logits
    assert verified.shape == steps.shape
    assert mx.array_equal(verified, steps).item()
    assert rows.position == alone.position


@pytest.mark.parametrize("family", ["llama", "gemma2", UNSUPPORTED])
def test_rejected_rows_leave_no_trace(engines, family):
    """Regression: trimming must restore the cache that decoding the kept tokens one by one gives
    (bit for bit), which a full-depth prefill of them gives to rounding (the decode kernels sum
    attention in another order than prefill's products)."""
    engine = engines[family]
    prompt, kept, rejected = list(range(3, 20)), [70, 71, 72], [90, 91, 92, 93]
    loop = _loop(engine)
    loop.prefill(prompt)
    loop.decode([*kept, *rejected], None)
    rollback(loop, len(rejected))
    after = loop.decode(33, None).logits
    reference = _loop(engine)
    reference.prefill(prompt)
    for t in kept:
        reference.decode(t, None)
    assert mx.array_equal(after, reference.decode(33, None).logits).item()
    fresh = _loop(engine)
    fresh.prefill([*prompt, *kept, 33])  # feeds prompt + kept, then decodes 33
    assert loop.position == reference.position == fresh.position
    for a, b, c in zip(loop.cache, reference.cache, fresh.cache, strict=True):
        assert a.offset == b.offset == c.offset
        for x, y, z in ((a.keys, b.keys, c.keys), (a.values, b.values, c.values)):
            assert mx.array_equal(x[..., : a.offset, :], y[..., : b.offset, :]).item()
            assert mx.allclose(x[..., : a.offset, :], z[..., : c.offset, :], atol=1e-5).item()


def test_sliding_window_caches_do_not_speculate(tokenizer):
    engine = tiny_engine(make_tiny_model("llama-sliding"), tokenizer)
    assert not can_speculate(_loop(engine))
    gen = engine.generate(GenerationRequest(REPEAT, SamplingParams(max_tokens=8), None, LOOKUP))
    list(gen)
    assert gen.stats.speculative is None


def test_lookup_drafts_what_followed_the_latest_match():
    drafter = LookupDrafter([1, 2, 3, 4, 5, 9, 2, 3, 7, 8, 1, 2, 3])
    assert drafter.draft(3) == [4, 5, 9]  # the trigram (1, 2, 3) before the bigram (2, 3)
    drafter.extend([4])
    assert drafter.draft(2) == [5, 9]
    assert LookupDrafter([9, 2, 3, 7, 2, 3]).draft(5) == [7, 2, 3]  # latest bigram match
    assert LookupDrafter([1, 2, 3]).draft(4) == []
    assert LookupDrafter([6, 1, 6]).draft(4) == [1, 6]  # unigram 6


def _run(engine, prompt, params, spec, eos=None):
    gen = engine.generate(GenerationRequest(tuple(prompt), params, None, spec))
    if eos is not None:
        gen._eos = frozenset({eos})
    events = list(gen)
    return [(e.token_id, e.text, e.finish_reason) for e in events], gen.stats


@pytest.mark.parametrize("family", [*SUPPORTED, UNSUPPORTED])
def test_greedy_output_identical_with_lookup(engines, family):
    engine = engines[family]
    params = SamplingParams(max_tokens=40)
    plain, _ = _run(engine, REPEAT, params, OFF)
    spec, stats = _run(engine, REPEAT, params, LOOKUP)
    assert spec == plain
    assert stats.speculative.drafts > 0


def test_cuts_inside_an_accepted_draft_where_plain_decoding_cuts(engines):
    engine = engines["llama"]
    long = SamplingParams(max_tokens=40)
    plain, _ = _run(engine, REPEAT, long, OFF)
    spec, stats = _run(engine, REPEAT, long, LOOKUP)
    assert spec == plain and stats.speculative.accepted_tokens > 0
    tokens = [t for t, _, _ in plain]
    for n in range(1, 12):  # max_tokens at every position of the early drafts
        params = SamplingParams(max_tokens=n)
        assert _run(engine, REPEAT, params, LOOKUP)[0] == _run(engine, REPEAT, params, OFF)[0]
    for eos in sorted(set(tokens[2:14])):  # an EOS that the answer reaches inside a draft
        assert _run(engine, REPEAT, long, LOOKUP, eos)[0] == _run(engine, REPEAT, long, OFF, eos)[0]
    text = "".join(t for _, t, _ in plain)
    for stop in {text[5:7], text[9:10], text[12:15]}:
        params = SamplingParams(max_tokens=40, stop=(stop,))
        assert _run(engine, REPEAT, params, LOOKUP)[0] == _run(engine, REPEAT, params, OFF)[0]


def test_greedy_with_repetition_penalty_and_logprobs(engines):
    engine = engines["qwen2"]
    params = SamplingParams(max_tokens=30, repetition_penalty=1.1, logprobs=2)
    gens = [engine.generate(GenerationRequest(REPEAT, params, None, s)) for s in (OFF, LOOKUP)]
    plain, spec = ([(e.token_id, e.logprob, e.top_logprobs) for e in g] for g in gens)
    assert spec == plain


def test_batched_with_neighbours_identical(engines):
    """Speculating and plain requests share steps; each gives its tokens alone, without spec."""
    engine = engines["llama"]
    requests = [
        GenerationRequest(REPEAT, SamplingParams(max_tokens=30), None, LOOKUP),
        GenerationRequest(tuple(range(40, 60)), SamplingParams(max_tokens=25), None, OFF),
        GenerationRequest(REPEAT[3:], SamplingParams(max_tokens=20, temperature=0.9, seed=3)),
        GenerationRequest(tuple(range(3, 12)) * 2, SamplingParams(max_tokens=28), None, LOOKUP),
    ]
    batched, alone, gens = batched_and_alone(engine, requests, 4)
    assert batched == alone
    assert gens[0].stats.speculative.accepted_tokens > 0


@pytest.mark.parametrize("prompt", [REPEAT, tuple(range(3, 40)), (7, 8, 7, 9, 7, 8, 7, 10) * 2])
def test_auto_identical_including_after_it_stops_speculating(engines, prompt):
    """auto may switch a request back to run-ahead decoding mid-way: tokens must not change."""
    engine = engines["llama"]
    params = SamplingParams(max_tokens=40)
    auto = SpeculativeSettings("auto", num_tokens=6)
    assert _run(engine, prompt, params, auto)[0] == _run(engine, prompt, params, OFF)[0]


def test_auto_stops_where_drafts_are_rejected():
    from octomil.engine.spec_auto import AUTO_WARMUP
    from octomil.engine.speculation import Speculator

    spec = Speculator(SpeculativeSettings("auto", 8), [1, 2, 3, 1, 2, 3])
    for _ in range(AUTO_WARMUP):  # the budget may pause it before the warm-up's end
        drafts = spec.propose(8)
        if not drafts:
            break
        spec.observe(len(drafts), 0)  # the model's own token was another one
    assert not spec.active and spec.propose(8) == []


@pytest.mark.parametrize("threshold", [0.5, 2.0])
def test_with_early_exit_identical_to_early_exit_without_speculation(tokenizer, threshold):
    """The verifier decides exits row by row as one-token steps would (same checks, same pending
    limit), so tokens equal early exit without speculation, which differ from full depth here."""
    from tiny_models import sharpen

    from octomil.config import EarlyExitSettings

    settings = EarlyExitSettings(threshold=threshold, min_layers_fraction=0.25)
    # Half-sharpened: exits happen, and exited tokens are not always the full-depth ones.
    engine = tiny_engine(sharpen(make_tiny_model("llama"), 2.0, 2.0), tokenizer, settings)
    params = SamplingParams(max_tokens=40)

    def run(spec, exits=settings):
        gen = engine.generate(GenerationRequest(REPEAT, params, exits, spec))
        return [e.token_id for e in gen], gen.stats

    plain, plain_stats = run(OFF)
    spec, stats = run(LOOKUP)
    assert spec == plain
    assert plain_stats.early_exit_tokens > 0 and stats.speculative.accepted_tokens > 0
    assert plain != run(OFF, EarlyExitSettings())[0]  # the exits matter to the tokens


def test_verification_rows_obey_the_never_exit_token_classes(tokenizer):
    """Regression: a verification's rows exited on never-exit tokens (the class check saw
    one-token steps only), so speculation changed the tokens of a request with token classes."""
    from tiny_models import sharpen

    from octomil.config import EarlyExitSettings
    from octomil.engine.token_classes import NeverExit

    settings = EarlyExitSettings(threshold=2.0, min_layers_fraction=0.25)
    engine = tiny_engine(sharpen(make_tiny_model("llama"), 2.0, 2.0), tokenizer, settings)
    params = SamplingParams(max_tokens=40)

    def run(spec):
        gen = engine.generate(GenerationRequest(REPEAT, params, settings, spec))
        return [(e.token_id, e.layers_used) for e in gen]

    exited = sorted({t for t, layers in run(OFF) if layers < engine.total_layers})
    assert exited, "the model exits"
    engine.set_never_exit(NeverExit(strings=tuple(tokenizer.decode([t]) for t in exited[:3])))
    plain = run(OFF)
    assert run(LOOKUP) == plain
