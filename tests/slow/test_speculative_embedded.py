"""Speculative decoding on the real embedded model: greedy tokens identical to decoding without
speculation, alone and batched with neighbours, with lookup and auto."""

import sys
from pathlib import Path

import pytest

from octomil.engine.engine import Engine
from octomil.engine.speculation import SpeculativeSettings
from octomil.engine.types import GenerationRequest, SamplingParams

pytestmark = pytest.mark.slow

sys.path.insert(0, str(Path(__file__).parents[1]))
from speculation_check import batched_and_alone  # noqa: E402

OFF = SpeculativeSettings("off")
PROMPTS = [
    "Rewrite in the past tense: Maria opens the meeting and reads the agenda.",
    "Rename x to count and return the code:\ndef f(x):\n    x = x + 1\n    return x",
    "Why is the sky blue?",
]


@pytest.fixture(scope="module")
def engine():
    return Engine.load(exit_policy="none")


def _request(engine, text, spec, max_tokens=24):
    ids = engine.encode_chat([{"role": "user", "content": text}])
    return GenerationRequest(tuple(ids), SamplingParams(max_tokens=max_tokens), None, spec)


def test_alone_identical(engine):
    spec = SpeculativeSettings("lookup", 8)
    accepted = 0
    for text in PROMPTS[:2]:
        plain = [e.token_id for e in engine.generate(_request(engine, text, OFF))]
        gen = engine.generate(_request(engine, text, spec))
        assert [e.token_id for e in gen] == plain
        accepted += gen.stats.speculative.accepted_tokens
    assert accepted > 0


def test_batched_with_neighbours_identical(engine):
    requests = [
        _request(engine, PROMPTS[0], SpeculativeSettings("lookup", 8)),
        _request(engine, PROMPTS[2], OFF, 16),
        _request(engine, PROMPTS[1], SpeculativeSettings("auto", 6), 20),
    ]
    batched, alone, gens = batched_and_alone(engine, requests, 3)
    assert batched == alone
