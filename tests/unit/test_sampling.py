"""Token selection (``octomil.engine.sampling``): greedy, seeded sampling, top-k/top-p, logprobs."""

import mlx.core as mx
import pytest

from octomil.engine.sampling import Sampler, top_logprobs
from octomil.engine.types import SamplingParams

VOCAB = 64


@pytest.fixture(scope="module")
def logits():
    return mx.random.normal((1, VOCAB), key=mx.random.key(3)) * 2


def draw(params, logits, n=20):
    sampler = Sampler(params, VOCAB)
    return [sampler(logits, []).token for _ in range(n)]


def test_greedy_is_argmax(logits):
    assert draw(SamplingParams(temperature=0.0), logits, 3) == [int(mx.argmax(logits).item())] * 3


def test_same_seed_same_tokens(logits):
    p = SamplingParams(temperature=1.0, seed=1234)
    assert draw(p, logits) == draw(p, logits)


def test_different_seeds_differ(logits):
    a = draw(SamplingParams(temperature=1.0, seed=1), logits)
    b = draw(SamplingParams(temperature=1.0, seed=2), logits)
    assert a != b


def test_top_k_one_is_greedy(logits):
    assert set(draw(SamplingParams(temperature=1.5, top_k=1, seed=0), logits)) == {
        int(mx.argmax(logits).item())
    }


def test_top_p_keeps_only_the_nucleus(logits):
    probs = mx.softmax(logits[0]).tolist()
    order = sorted(range(VOCAB), key=lambda i: -probs[i])
    nucleus, mass = set(), 0.0
    for i in order:
        nucleus.add(i)
        mass += probs[i]
        if mass >= 0.5:
            break
    tokens = draw(SamplingParams(temperature=1.0, top_p=0.5, seed=7), logits, 50)
    assert set(tokens) <= nucleus


def test_logprobs_are_log_softmax(logits):
    choice = Sampler(SamplingParams(), VOCAB)(logits, [])
    assert mx.allclose(mx.exp(choice.logprobs).sum(), mx.array(1.0), atol=1e-5)
    best = top_logprobs(choice.logprobs, 3)
    assert best[0][0] == choice.token and best[0][1] >= best[1][1] >= best[2][1]


def test_repetition_penalty_lowers_repeated_token(logits):
    top = int(mx.argmax(logits).item())
    plain = Sampler(SamplingParams(), VOCAB)(logits, [top]).logprobs[top].item()
    penalised = (
        Sampler(SamplingParams(repetition_penalty=1.5), VOCAB)(logits, [top]).logprobs[top].item()
    )
    assert penalised < plain


def test_logit_bias_forces_and_bans(logits):
    target = int(mx.argmin(logits).item())
    assert draw(SamplingParams(logit_bias=((target, 100.0),)), logits, 2) == [target] * 2
    top = int(mx.argmax(logits).item())
    assert top not in draw(
        SamplingParams(temperature=1.0, seed=0, logit_bias=((top, -100.0),)), logits
    )


def test_frequency_and_presence_penalties_count_output_tokens_only(logits):
    """OpenAI's formula: logit - count * frequency - (count > 0) * presence; the prompt (the
    first ``prompt_len`` history tokens) is not counted."""
    top = int(mx.argmax(logits).item())
    params = SamplingParams(frequency_penalty=0.5, presence_penalty=0.25)
    history = [top, 1, top, top]  # prompt: [top]; output: [1, top, top]
    choice = Sampler(params, VOCAB, prompt_len=1)(logits, history)
    lp = choice.logprobs
    shifted = (
        logits[0]
        - mx.zeros((VOCAB,)).at[mx.array([1, top, top])].add(0.5)
        - (mx.zeros((VOCAB,)).at[mx.array([1, top])].add(0.25))
    )
    want = shifted - mx.logsumexp(shifted)
    assert mx.allclose(lp, want, atol=1e-5)
