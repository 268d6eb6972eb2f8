"""The speculative-sampling acceptance rule (``engine.spec_accept``) keeps the target distribution,
and a sampled speculating request is reproducible from its seed."""

import math

import mlx.core as mx
from tiny_models import make_byte_tokenizer, make_tiny_model, tiny_engine

from octomil.engine.spec_accept import accept_sampled
from octomil.engine.speculation import SpeculativeSettings
from octomil.engine.types import GenerationRequest, SamplingParams

# Two target rows over 5 tokens; drafts [1, 3]: the first output token must follow row 0, the
# second (when the first draft was accepted) row 1.
LOGITS = mx.log(mx.array([[0.1, 0.4, 0.2, 0.2, 0.1], [0.3, 0.1, 0.1, 0.4, 0.1], [0.2] * 5]))
DRAFTS = [1, 3]
N = 6000


def _chi_square(counts: list[int], probs: list[float]) -> float:
    total = sum(counts)
    return sum((c - total * p) ** 2 / (total * p) for c, p in zip(counts, probs, strict=True))


# 99.9% quantile of chi-square with 4 degrees of freedom: a correct rule fails 1 run in 1000;
# the seeds are fixed, so the test is deterministic.
CHI2_4_999 = 18.47


def _first_two(draft_probs=None):
    """Counts of the first output token, and of the second once the first draft was accepted.
    With ``draft_probs`` the drafts are drawn from them (as a draft model would)."""
    first, second = [0] * 5, [0] * 5
    key = mx.random.key(1234)
    for _ in range(N):
        key, sub, draw = mx.random.split(key, 3)
        drafts = DRAFTS
        if draft_probs is not None:
            drafts = mx.random.categorical(mx.log(draft_probs), key=draw).tolist()
        m, follow = accept_sampled(LOGITS, drafts, sub, draft_probs)
        tokens = [*drafts[:m], follow]
        first[tokens[0]] += 1
        if m >= 1:
            second[tokens[1]] += 1
    return first, second


def test_deterministic_drafter_keeps_the_target_distribution():
    first, second = _first_two()
    p = mx.softmax(LOGITS, axis=-1).tolist()
    assert _chi_square(first, p[0]) < CHI2_4_999
    assert _chi_square(second, p[1]) < CHI2_4_999


def test_draft_model_probabilities_keep_the_target_distribution():
    q = mx.array([[0.05, 0.6, 0.05, 0.2, 0.1], [0.25, 0.25, 0.0, 0.3, 0.2]])
    first, second = _first_two(q)
    p = mx.softmax(LOGITS, axis=-1).tolist()
    assert _chi_square(first, p[0]) < CHI2_4_999
    assert _chi_square(second, p[1]) < CHI2_4_999


def test_all_accepted_draws_the_extra_token_from_the_last_row():
    sure = mx.log(mx.array([[1e-9, 1.0, 1e-9], [1e-9, 1e-9, 1.0], [1.0, 1e-9, 1e-9]]))
    assert accept_sampled(sure, [1, 2], mx.random.key(0)) == (2, 0)
    assert not math.isnan(float(mx.softmax(sure, axis=-1).sum()))


def test_sampled_speculation_is_reproducible_from_the_seed():
    engine = tiny_engine(make_tiny_model("llama"), make_byte_tokenizer())
    prompt = tuple([5, 9, 11, 40, 50, 61, 7, 8] * 3)
    params = SamplingParams(max_tokens=30, temperature=0.3, seed=7)
    spec = SpeculativeSettings("lookup", 5)
    runs = []
    for _ in range(2):
        gen = engine.generate(GenerationRequest(prompt, params, None, spec))
        runs.append([e.token_id for e in gen])
        assert gen.stats.speculative.drafts > 0
    assert runs[0] == runs[1]
