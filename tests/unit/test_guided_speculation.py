"""Speculative decoding of constrained requests (``engine.guided_drafts``): drafts follow the
grammar, every verification row is masked with the grammar's state after the drafts before it
(at the last layer and at exit checks), forced tokens are still emitted without the model, and a
greedy constrained request emits exactly the tokens it emits without speculation."""

import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import jsonschema
import mlx.core as mx
import pytest
from tiny_models import make_byte_tokenizer, make_tiny_model, sharpen, tiny_engine

from octomil.config import EarlyExitSettings
from octomil.engine.constraint import GrammarSpec, apply_mask
from octomil.engine.exit_policy import ExitPolicy
from octomil.engine.guided_drafts import DraftGuide
from octomil.engine.layer_loop import DecodeInput, LayerLoop, decode_batch
from octomil.engine.speculation import SpeculativeSettings
from octomil.engine.types import GenerationRequest, SamplingParams

sys.path.insert(0, str(Path(__file__).parents[1]))
from speculation_check import batched_and_alone  # noqa: E402

OFF = SpeculativeSettings("off")
LOOKUP = SpeculativeSettings("lookup", num_tokens=6)
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "tags": {"type": "array", "items": {"enum": ["ab", "cd"]}, "maxItems": 3},
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["name", "tags", "n"],
    "additionalProperties": False,
}
RECORD = '{"name":"ada lovelace","tags":["ab","cd"],"n":36}'
# A prompt that repeats itself: random tiny models copy it, so lookup drafts get accepted.
REPEAT = tuple([5, 9, 11, 40, 50, 61, 7, 8] * 3)
REPEAT_CLASS = "[\\x05\\x09\\x0b(2=\\x07\\x08]"
# Six copied bytes, a forced run (drafts stop before it), then copied bytes again.
REPEAT_REGEX = f"{REPEAT_CLASS}{{6}}xyz{REPEAT_CLASS}{{6,20}}"


@pytest.fixture(scope="module")
def tokenizer():
    return make_byte_tokenizer()


@pytest.fixture(scope="module")
def engine(tokenizer):
    return tiny_engine(make_tiny_model("llama"), tokenizer)


def _prompt(tokenizer) -> tuple[int, ...]:
    return tuple(tokenizer.encode(f"Record: {RECORD} again {RECORD} {RECORD[:9]}"))


def _run(engine, prompt, grammar, spec, exits=None, max_tokens=80):
    params = SamplingParams(max_tokens=max_tokens, grammar=grammar)
    gen = engine.generate(GenerationRequest(prompt, params, exits, spec))
    events = list(gen)
    return [e.token_id for e in events], "".join(e.text for e in events), gen.stats


@pytest.mark.parametrize("family", ["llama", "qwen2", "starcoder2"])
def test_json_schema_greedy_identical_with_lookup(tokenizer, family):
    engine = tiny_engine(make_tiny_model(family), tokenizer)
    grammar = GrammarSpec("json_schema", SCHEMA)
    plain, text, plain_stats = _run(engine, _prompt(tokenizer), grammar, OFF)
    spec, _, stats = _run(engine, _prompt(tokenizer), grammar, LOOKUP)
    assert spec == plain
    jsonschema.validate(json.loads(text), SCHEMA)
    assert stats.finish_reason == "stop" and stats.forced_tokens == plain_stats.forced_tokens > 0
    assert stats.speculative.drafts > 0 and stats.speculative.accepted_tokens > 0


def test_sampled_constrained_requests_speculate_and_stay_valid(engine, tokenizer):
    """Sampled: the acceptance rule works on the masked rows (drafts are always allowed)."""
    params = SamplingParams(
        max_tokens=80, temperature=0.8, seed=3, grammar=GrammarSpec("json_schema", SCHEMA)
    )
    for seed in range(3):
        request = GenerationRequest(_prompt(tokenizer), replace(params, seed=seed), None, LOOKUP)
        gen = engine.generate(request)
        text = "".join(e.text for e in gen)
        jsonschema.validate(json.loads(text), SCHEMA)
        assert gen.stats.finish_reason == "stop" and gen.stats.speculative.drafts > 0


def test_with_early_exit_identical_to_early_exit_without_speculation(tokenizer):
    """Rows exit on their own masked distributions, as one-token steps do; a forced run in the
    middle ends the drafts (its tokens come from the grammar, not from the bonus row)."""
    settings = EarlyExitSettings(threshold=2.0, min_layers_fraction=0.25)
    engine = tiny_engine(sharpen(make_tiny_model("llama"), 2.0, 2.0), tokenizer, settings)
    grammar = GrammarSpec("regex", REPEAT_REGEX)
    plain, text, plain_stats = _run(engine, REPEAT, grammar, OFF, settings, 40)
    spec, _, stats = _run(engine, REPEAT, grammar, LOOKUP, settings, 40)
    assert spec == plain and "xyz" in text
    assert plain_stats.early_exit_tokens > 0 and stats.forced_tokens == 3
    assert stats.speculative.accepted_tokens > 0
    full, _, _ = _run(engine, REPEAT, grammar, OFF, EarlyExitSettings(), 40)
    assert plain != full  # the exits matter to the tokens


def test_draft_model_argmaxes_under_the_mask(tokenizer):
    """A draft model that is the target itself drafts under the same masks: all accepted."""
    target = tiny_engine(make_tiny_model("llama"), tokenizer)
    target.add_draft_model("same", tiny_engine(make_tiny_model("llama"), tokenizer).loaded)
    grammar = GrammarSpec("json_schema", SCHEMA)
    plain, _, _ = _run(target, _prompt(tokenizer), grammar, OFF)
    spec, _, stats = _run(target, _prompt(tokenizer), grammar, SpeculativeSettings("model:same", 4))
    assert spec == plain
    assert stats.speculative.draft_tokens > 0
    assert stats.speculative.accepted_tokens == stats.speculative.draft_tokens


def test_batched_with_neighbours_identical(engine, tokenizer):
    grammar, regex = GrammarSpec("json_schema", SCHEMA), GrammarSpec("regex", REPEAT_REGEX)
    prompt = _prompt(tokenizer)
    requests = [
        GenerationRequest(prompt, SamplingParams(max_tokens=60, grammar=grammar), None, LOOKUP),
        GenerationRequest(REPEAT, SamplingParams(max_tokens=25), None, LOOKUP),
        GenerationRequest(prompt[4:], SamplingParams(max_tokens=30, grammar=grammar), None, OFF),
        GenerationRequest(REPEAT, SamplingParams(max_tokens=30, grammar=regex), None, LOOKUP),
    ]
    batched, alone, gens = batched_and_alone(engine, requests, 4)
    assert batched == alone
    assert gens[0].stats.speculative.accepted_tokens > 0


def test_guide_cuts_drafts_and_stops_before_forced_tokens(engine, tokenizer):
    grammar = engine.grammars.compile(GrammarSpec("regex", "[ab]{2}xyz[0-9]+"))
    guide = DraftGuide(grammar, frozenset({256}))
    assert guide.take(list(b"ab9")) == list(b"ab")  # "9" is not allowed after "ab": cut
    assert guide.forced_end and not guide.open  # "xyz" is forced after "ab"
    drafts, masks = guide.finish()
    assert masks.shape == (3, 320)
    allowed = [[t for t, ok in enumerate(m.tolist()) if ok] for m in masks]
    assert allowed[0] == allowed[1] == [ord("a"), ord("b")] and allowed[2] == [ord("x")]
    assert grammar.forced() == [] and grammar.accept(ord("b"))  # rolled back to the start
    guide = DraftGuide(engine.grammars.compile(GrammarSpec("regex", "a+")), frozenset({256}))
    assert guide.take([ord("a"), 256, ord("a")]) == [ord("a")]  # EOS is never drafted


def test_verification_rows_take_their_own_masks(engine):
    """Row j of a masked verification (logits and exit decisions) equals a one-token step with
    row j's mask, bit for bit."""
    anatomy, model = engine.loaded.anatomy, engine.loaded.model
    prompt, tokens = list(range(3, 30)), [5, 9, 11, 40]
    vocab = mx.arange(320)
    masks = mx.stack([(vocab % (j + 2)) == 0 for j in range(len(tokens))])
    policy = ExitPolicy(math.inf, 1, (2,), anatomy.num_layers)

    def loop():
        lp = LayerLoop(anatomy, model)
        lp.feed(prompt)
        return lp

    rows = loop()
    verified = decode_batch(anatomy, [DecodeInput(rows, tokens, policy, masks)])[0]
    alone = loop()
    for j, token in enumerate(tokens):
        step = decode_batch(anatomy, [DecodeInput(alone, token, policy, masks[j])])[0]
        alone.flush()
        assert step.exited and step.depth == 2
        assert mx.array_equal(verified.logits[j : j + 1], step.logits).item()
        assert mx.array_equal(apply_mask(step.logits, masks[j]), step.logits).item()
