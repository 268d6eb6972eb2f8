"""``auto`` speculation (``engine.spec_auto``): it pauses where drafting does not pay, also where
no draft is ever found, resumes where its shadow drafts come true, and switching either way
mid-request leaves the tokens those of decoding without speculation."""

import sys
from pathlib import Path

import pytest
from tiny_models import make_byte_tokenizer, make_tiny_model, tiny_engine

from octomil.engine import spec_auto
from octomil.engine.spec_auto import AUTO_BUDGET, REARM, SYNC_COST
from octomil.engine.speculation import SpeculativeSettings, Speculator
from octomil.engine.types import GenerationRequest, SamplingParams

sys.path.insert(0, str(Path(__file__).parents[1]))
from speculation_check import batched_and_alone  # noqa: E402

AUTO = SpeculativeSettings("auto", num_tokens=6)


def test_pauses_when_no_draft_is_ever_found():
    """Regression: a request without 2-token matches (open chat) kept speculating, and so lost
    run-ahead on every step, until it had made AUTO_WARMUP drafts, which might never happen."""
    spec = Speculator(AUTO, [1, 2, 3])
    steps = 0
    while spec.active:
        assert spec.propose(8) == []
        spec.extend([100 + steps])
        steps += 1
    assert steps == int(AUTO_BUDGET / SYNC_COST) + 1


def test_resumes_when_shadow_drafts_come_true():
    prompt = [10, 11, 12, 13, 14, 15, 16, 17, 18, 19]
    spec = Speculator(AUTO, prompt)
    steps = 0
    while spec.active:  # the answer does not copy yet: pause
        spec.propose(8)
        spec.extend([200 + steps])
        steps += 1
    spec.extend([10, 11])  # the copy starts: the shadow draft after "10 11" is 12, 13, ...
    spec.extend(prompt[2 : 2 + REARM - 1])
    assert not spec.active
    spec.extend([prompt[1 + REARM]])  # REARM tokens predicted in a row
    assert spec.active and spec.propose(8) == prompt[2 + REARM : 4 + REARM]  # K = 2 at a = 1/2


@pytest.fixture(scope="module")
def engine():
    return tiny_engine(make_tiny_model("llama"), make_byte_tokenizer())


@pytest.mark.parametrize("prompt", [tuple(range(3, 40)), (7, 8, 7, 9, 7, 8, 7, 10) * 2])
def test_identical_when_pausing_and_resuming_mid_request(engine, prompt, monkeypatch):
    """A budget below zero pauses at every step and the repeating output resumes it: the
    request switches between run-ahead and verification steps many times."""

    def run(settings):
        gen = engine.generate(
            GenerationRequest(prompt, SamplingParams(max_tokens=40), None, settings)
        )
        return [e.token_id for e in gen], gen

    plain, _ = run(SpeculativeSettings("off"))
    monkeypatch.setattr(spec_auto, "AUTO_BUDGET", -0.01)
    tokens, gen = run(AUTO)
    policy = gen._spec._auto
    assert tokens == plain
    assert policy.pauses > 2 and policy.resumes > 1


def test_batched_identical_when_pausing_and_resuming(engine, monkeypatch):
    """Pausing and resuming requests beside a plain one and a sampled one: each request's tokens
    equal its tokens alone without speculation."""
    monkeypatch.setattr(spec_auto, "AUTO_BUDGET", -0.01)
    params = SamplingParams(max_tokens=30)
    requests = [
        GenerationRequest(tuple(range(3, 40)), params, None, AUTO),
        GenerationRequest(tuple(range(40, 60)), params, None, SpeculativeSettings("off")),
        GenerationRequest((7, 8, 7, 9, 7, 8, 7, 10) * 2, params, None, AUTO),
        GenerationRequest(
            tuple(range(5, 20)), SamplingParams(max_tokens=25, temperature=0.9, seed=3)
        ),
    ]
    batched, alone, gens = batched_and_alone(engine, requests, 4)
    assert batched == alone
    assert gens[0]._spec._auto.resumes > 0 and gens[2]._spec._auto.resumes > 0
