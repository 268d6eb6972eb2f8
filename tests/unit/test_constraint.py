"""Grammar-constrained decoding (``octomil.engine.constraint``) inside the early-exit layer loop.

A sharpened tiny model's shared head is confident at every layer (it predicts the input token),
so a policy that checks after layer 1 would exit on it: the tests show that the check measures
the *masked* distribution and that an exited token is always one the grammar allowed.
"""

import math
import re

import mlx.core as mx
import numpy as np
import pytest
import tiny_models

from octomil.engine.constraint import GrammarError, GrammarSpec, apply_mask
from octomil.engine.exit_policy import ExitPolicy, entropy_nats
from octomil.engine.layer_loop import DecodeInput, LayerLoop, decode_batch
from octomil.engine.types import GenerationRequest, SamplingParams

PROMPT = [ord(c) for c in "abcabc"]


@pytest.fixture(scope="module")
def engine():
    model = tiny_models.sharpen(tiny_models.make_tiny_model("llama", seed=3))
    return tiny_models.tiny_engine(model, tiny_models.make_byte_tokenizer())


def exit_at(depth: int, threshold: float) -> ExitPolicy:
    return ExitPolicy(threshold, 1, (depth,), tiny_models.NUM_LAYERS)


def _step(engine, policy, mask):
    loop = LayerLoop(engine.loaded.anatomy, engine.loaded.model)
    loop.feed(PROMPT[:-1])
    return decode_batch(engine.loaded.anatomy, [DecodeInput(loop, PROMPT[-1], policy, mask)])[0]


def test_exit_entropy_is_taken_over_the_allowed_tokens(engine):
    """Regression: a token confident only before the mask must not exit (JSON keys breaking)."""
    free = _step(engine, exit_at(1, math.inf), None)
    top = int(mx.argmax(free.logits).item())
    confident = float(entropy_nats(free.logits).item())
    allowed = mx.arange(tiny_models.VOCAB_SIZE) != top  # the grammar forbids the confident token
    masked_entropy = float(entropy_nats(apply_mask(free.logits, allowed)).item())
    assert confident < masked_entropy
    threshold = (confident + masked_entropy) / 2
    assert _step(engine, exit_at(1, threshold), None).exited  # unmasked: would leave at layer 1
    constrained = _step(engine, exit_at(1, threshold), allowed)
    assert not constrained.exited and constrained.depth == tiny_models.NUM_LAYERS
    exited = _step(engine, exit_at(1, math.inf), allowed)
    assert exited.exited and exited.depth == 1
    assert exited.entropy == pytest.approx(masked_entropy, rel=1e-5)
    assert float(exited.logits[0, top].item()) == -math.inf


def test_masked_entropy_matches_numpy_reference():
    logits = mx.array([[2.0, 1.0, 0.5, -1.0]])
    mask = mx.array([True, False, True, True])
    kept = np.array([2.0, 0.5, -1.0])
    p = np.exp(kept - kept.max()) / np.exp(kept - kept.max()).sum()
    assert float(entropy_nats(apply_mask(logits, mask)).item()) == pytest.approx(
        float(-(p * np.log(p)).sum()), rel=1e-6
    )


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_always_exiting_tokens_stay_in_the_grammar(engine, temperature):
    """With a policy that exits every token after layer 1, the output still matches."""
    pattern = "(ab|ba)c[0-9]{2}"
    params = SamplingParams(
        max_tokens=20, temperature=temperature, seed=1, grammar=GrammarSpec("regex", pattern)
    )
    gen = engine.generate(GenerationRequest(tuple(PROMPT), params))
    gen.policy = exit_at(1, math.inf)
    events = list(gen)
    text = "".join(e.text for e in events)
    assert re.fullmatch(pattern, text), text
    assert events[-1].finish_reason == "stop"
    model_tokens = [e for e in events if not e.forced]
    assert all(e.exited_early for e in model_tokens[1:])  # the first comes from prefill
    assert gen.stats.forced_tokens == sum(e.forced for e in events)


def test_forced_tokens_skip_the_model(engine):
    """A fixed run after a free byte is emitted without the model, then fed as one chunk."""
    params = SamplingParams(max_tokens=20, grammar=GrammarSpec("regex", "[ab]xylophone[0-9]"))
    gen = engine.generate(GenerationRequest(tuple(PROMPT), params))
    events = list(gen)
    text = "".join(e.text for e in events)
    assert re.fullmatch("[ab]xylophone[0-9]", text), text
    assert [e.forced for e in events] == [False] + [True] * 9 + [False]
    assert gen.stats.forced_tokens == 9 and gen.stats.finish_reason == "stop"
    # The fast-forwarded run reached the cache before the digit's step: all but the last token.
    assert gen.loop.position == len(PROMPT) + len(text) - 1


def test_unfinished_grammar_at_max_tokens_is_length(engine):
    params = SamplingParams(max_tokens=3, grammar=GrammarSpec("regex", "[a-z]{10}"))
    gen = engine.generate(GenerationRequest(tuple(PROMPT), params))
    text = "".join(e.text for e in gen)
    assert len(text) == 3 and gen.stats.finish_reason == "length"


def test_batched_sequences_keep_their_own_grammar(engine):
    from octomil.engine.scheduler import Scheduler, SchedulerConfig

    patterns = ["[0-9]{4}", "[xyz]{3}", None]
    gens = []
    for p in patterns:
        grammar = GrammarSpec("regex", p) if p else None
        params = SamplingParams(max_tokens=6, grammar=grammar, ignore_eos=True)
        gens.append(engine.generate(GenerationRequest(tuple(PROMPT), params)))
    alone = []
    for p in patterns:
        grammar = GrammarSpec("regex", p) if p else None
        params = SamplingParams(max_tokens=6, grammar=grammar, ignore_eos=True)
        alone.append(
            "".join(e.text for e in engine.generate(GenerationRequest(tuple(PROMPT), params)))
        )
    scheduler = Scheduler(SchedulerConfig(max_batch_size=4))
    for g in gens:
        scheduler.submit(g)
    texts = {id(g): "" for g in gens}
    while not scheduler.idle:
        for g, event in scheduler.step().events:
            texts[id(g)] += event.text
    got = [texts[id(g)] for g in gens]
    assert got == alone
    assert re.fullmatch("[0-9]{4}", got[0]) and re.fullmatch("[xyz]{3}", got[1])


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        (GrammarSpec("regex", "[a-", "guided_regex"), "unclosed character class"),
        (GrammarSpec("json_schema", {"type": "foo"}), "Invalid type: foo"),
        (GrammarSpec("json_schema", {"not": {"type": "string"}}), 'Unimplemented keys: ["not"]'),
        (GrammarSpec("choice", (), "guided_choice"), "non-empty list"),
    ],
)
def test_bad_grammars_name_the_problem(engine, spec, fragment):
    with pytest.raises(GrammarError) as info:
        engine.grammars.compile(spec)
    assert fragment in str(info.value) and info.value.param == spec.param


def test_top_logprobs_leave_out_masked_tokens(engine):
    """Regression: a choice of 2 with top_logprobs=5 listed -inf alternatives (not JSON)."""
    params = SamplingParams(max_tokens=4, logprobs=5, grammar=GrammarSpec("choice", ("ab", "ba")))
    events = list(engine.generate(GenerationRequest(tuple(PROMPT), params)))
    first = events[0]
    assert len(first.top_logprobs) == 2
    assert all(math.isfinite(t.logprob) for e in events for t in e.top_logprobs)


def test_fast_forwarded_cache_matches_a_full_forward_pass():
    """The step after a fast-forwarded run sees exactly the cache of a full-depth pass over
    prompt + output: its (masked) logprob equals the reference computed in one forward pass."""
    model = tiny_models.make_tiny_model("llama", seed=5)
    reference = tiny_models.make_tiny_model("llama", seed=5)
    engine = tiny_models.tiny_engine(model, tiny_models.make_byte_tokenizer())
    pattern = "[ab]xylophone[0-9]"
    params = SamplingParams(max_tokens=20, logprobs=0, grammar=GrammarSpec("regex", pattern))
    events = list(engine.generate(GenerationRequest(tuple(PROMPT), params)))
    tokens = PROMPT + [e.token_id for e in events]
    logits = reference(mx.array([tokens[:-1]]))[0, -1]
    digits = mx.array([ord("0") <= t <= ord("9") for t in range(tiny_models.VOCAB_SIZE)])
    masked = apply_mask(logits[None], digits)[0]
    want = masked - mx.logsumexp(masked)
    assert events[-1].logprob.logprob == pytest.approx(float(want[tokens[-1]].item()), abs=1e-4)
