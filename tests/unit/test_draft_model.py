"""``model:NAME`` drafting (``engine.draft_model``) with tiny random models: greedy tokens identical
to decoding without speculation, every draft accepted when the draft model is the target itself,
and a draft model with another vocabulary refused with a clear error."""

import sys
from pathlib import Path

import pytest
from tiny_models import make_byte_tokenizer, make_tiny_model, tiny_engine

from octomil.engine.draft_model import DraftModelError
from octomil.engine.errors import EngineInputError
from octomil.engine.speculation import SpeculativeSettings
from octomil.engine.types import GenerationRequest, SamplingParams

PROMPT = tuple([5, 9, 11, 40, 50, 61, 7, 8] * 2)
sys.path.insert(0, str(Path(__file__).parents[1]))
from speculation_check import batched_and_alone  # noqa: E402

OFF = SpeculativeSettings("off")


@pytest.fixture(scope="module")
def engine():
    tokenizer = make_byte_tokenizer()
    target = tiny_engine(make_tiny_model("llama"), tokenizer)
    same = tiny_engine(make_tiny_model("llama"), tokenizer).loaded  # same weights as the target
    other = tiny_engine(make_tiny_model("qwen2", seed=3), tokenizer).loaded
    target.add_draft_model("same", same)
    target.add_draft_model("other", other)
    return target


def _tokens(engine, spec):
    gen = engine.generate(GenerationRequest(PROMPT, SamplingParams(max_tokens=30), None, spec))
    return [e.token_id for e in gen], gen.stats.speculative


@pytest.mark.parametrize("name", ["same", "other"])
def test_greedy_identical(engine, name):
    plain, _ = _tokens(engine, OFF)
    spec, stats = _tokens(engine, SpeculativeSettings(f"model:{name}", 4))
    assert spec == plain and stats.drafts > 0
    if name == "same":  # the target drafting for itself: every draft is its own choice
        assert stats.accepted_tokens == stats.draft_tokens


def test_batched_with_neighbours(engine):
    requests = [
        GenerationRequest(
            PROMPT, SamplingParams(max_tokens=20), None, SpeculativeSettings("model:other", 3)
        ),
        GenerationRequest(
            PROMPT[2:], SamplingParams(max_tokens=15), None, SpeculativeSettings("lookup", 4)
        ),
        GenerationRequest(
            PROMPT[4:], SamplingParams(max_tokens=18), None, SpeculativeSettings("model:same", 5)
        ),
    ]
    batched, alone, gens = batched_and_alone(engine, requests, 3)
    assert batched == alone


def test_other_vocabulary_is_refused(engine):
    wide = tiny_engine(make_tiny_model("llama", vocab_size=330), make_byte_tokenizer(330)).loaded
    with pytest.raises(DraftModelError, match="different vocabulary.*330 vs 320 tokens"):
        engine.add_draft_model("wide", wide)


def test_unknown_draft_model_is_an_input_error(engine):
    with pytest.raises(EngineInputError, match="'nope' is not loaded") as info:
        _tokens(engine, SpeculativeSettings("model:nope"))
    assert info.value.param == "speculative.mode"
