"""Per-family anatomy: at full depth the engine reproduces stock mlx-lm, on a tiny random model of
every supported family (and an unsupported one served through the model's own forward pass).

References are mlx-lm itself: ``generate_step`` with a greedy sampler and ``model(tokens)``.
"""

import octomil  # noqa: F401, I001  (loads OpenBLAS; must precede every mlx import)

import logging
import random

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import make_prompt_cache
from tiny_models import NUM_LAYERS, SUPPORTED, UNSUPPORTED, make_tiny_model, sharpen, tiny_engine

from octomil.config import EarlyExitSettings
from octomil.engine.exit_policy import ExitPolicy
from octomil.engine.layer_loop import LayerLoop
from octomil.engine.types import GenerationRequest, SamplingParams
from octomil.models.anatomy import anatomy_of

NEW_TOKENS = 24
PROMPT = random.Random(0).choices(range(256), k=10)
GREEDY = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
# Early exit allowed from the first layer on; 1.0 nats is a high but legitimate threshold.
EXIT_ON = EarlyExitSettings(threshold=1.0, min_layers_fraction=0.25)

SUPPORTED_VARIANTS = [*SUPPORTED, "llama-untied", "qwen2-untied", "llama-sliding"]
ALL_VARIANTS = [*SUPPORTED_VARIANTS, UNSUPPORTED]


def stock_greedy(model: nn.Module, prompt: list[int], n: int) -> list[int]:
    steps = generate_step(
        mx.array(prompt), model, max_tokens=n, sampler=lambda lp: mx.argmax(lp, axis=-1)
    )
    return [int(token) for token, _ in steps]


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_full_depth_greedy_matches_mlx_lm(variant, byte_tokenizer):
    reference = make_tiny_model(variant)  # stock modules: tiny_engine swaps in table RoPE
    engine = tiny_engine(make_tiny_model(variant), byte_tokenizer)
    gen = engine.generate(GenerationRequest(tuple(PROMPT), GREEDY))
    events = list(gen)

    assert [e.token_id for e in events] == stock_greedy(reference, PROMPT, NEW_TOKENS)
    assert all(e.layers_used == NUM_LAYERS and not e.exited_early for e in events)
    assert gen.stats.completion_tokens == NEW_TOKENS and gen.stats.finish_reason == "length"


@pytest.mark.parametrize("variant", SUPPORTED_VARIANTS)
def test_prefill_logits_match_model(variant):
    model = make_tiny_model(variant)
    logits = LayerLoop(anatomy_of(model), model).prefill(PROMPT)

    # Bit for bit against mlx-lm's own prefill schedule (all but the last token, then the last).
    cache = make_prompt_cache(model)
    model(mx.array(PROMPT[:-1])[None], cache=cache)
    stock = model(mx.array(PROMPT[-1:])[None], cache=cache)[:, -1]
    assert mx.array_equal(logits, stock)
    # One full-sequence forward sums the last row's attention in another order: close, not equal.
    whole = model(mx.array(PROMPT)[None])[:, -1]
    assert mx.allclose(logits, whole, rtol=1e-5, atol=1e-5)


def _capture_calls(monkeypatch, module: nn.Module) -> list[mx.array]:
    """Record the input of every call to ``module`` (patched on its class, filtered by identity)."""
    seen: list[mx.array] = []
    cls = type(module)
    original = cls.__call__

    def spy(self, x, *args, **kwargs):
        if self is module:
            seen.append(x)
        return original(self, x, *args, **kwargs)

    monkeypatch.setattr(cls, "__call__", spy)
    return seen


def _check_anatomy(model: nn.Module, monkeypatch) -> mx.array:
    anatomy = anatomy_of(model)
    tokens = mx.array(PROMPT)[None]
    first_layer_in = _capture_calls(monkeypatch, model.model.layers[0])
    final_norm_in = _capture_calls(monkeypatch, model.model.norm)
    out = model(tokens)
    assert len(first_layer_in) == 1 and len(final_norm_in) == 1

    assert mx.array_equal(anatomy.embed(tokens), first_layer_in[0])  # embedding and its scaling
    assert mx.array_equal(anatomy.logits(final_norm_in[0]), out)  # final norm, head, soft-cap
    return final_norm_in[0]


@pytest.mark.parametrize("variant", SUPPORTED_VARIANTS)
def test_anatomy_reproduces_model_head(variant, monkeypatch):
    model = make_tiny_model(variant)
    _check_anatomy(model, monkeypatch)
    tied = getattr(model.args, "tie_word_embeddings", True)
    assert hasattr(model, "lm_head") == (not tied)


def test_gemma2_final_softcap_is_applied(monkeypatch):
    # A cap small enough that raw logits exceed it: a head without the soft-cap would differ.
    model = make_tiny_model("gemma2", final_logit_softcapping=2.0)
    final_hidden = _check_anatomy(model, monkeypatch)
    anatomy = anatomy_of(model)
    raw = model.model.embed_tokens.as_linear(anatomy.norm(final_hidden))
    cap = model.final_logit_softcapping
    assert mx.abs(raw).max().item() > cap
    assert mx.abs(anatomy.logits(final_hidden)).max().item() < cap


def test_unsupported_family_served_at_full_depth(byte_tokenizer, caplog):
    model, reference = make_tiny_model(UNSUPPORTED), make_tiny_model(UNSUPPORTED)
    assert anatomy_of(model) is None
    with caplog.at_level(logging.WARNING, logger="octomil.engine.engine"):
        engine = tiny_engine(model, byte_tokenizer, early_exit=EXIT_ON)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and UNSUPPORTED in warnings[0].getMessage()
    assert engine.early_exit_supported is False

    gen = engine.generate(GenerationRequest(tuple(PROMPT), GREEDY, early_exit=EXIT_ON))
    events = list(gen)
    assert [e.token_id for e in events] == stock_greedy(reference, PROMPT, NEW_TOKENS)
    assert all(e.layers_used == NUM_LAYERS and not e.exited_early for e in events)
    assert gen.stats.early_exit_tokens == 0 and gen.stats.avg_layers_used == NUM_LAYERS


@pytest.mark.parametrize("variant", SUPPORTED_VARIANTS)
def test_early_exits_happen(variant, byte_tokenizer):
    model = sharpen(make_tiny_model(variant))
    engine = tiny_engine(model, byte_tokenizer, early_exit=EXIT_ON)
    gen = engine.generate(GenerationRequest(tuple(PROMPT), GREEDY))
    events = list(gen)
    stats = gen.stats

    assert len(events) == NEW_TOKENS and stats.finish_reason == "length"
    assert stats.early_exit_tokens > 0
    assert stats.avg_layers_used < NUM_LAYERS
    exit_layers = engine.policy_for(None).exit_layers
    for e in events:
        if e.exited_early:
            assert e.layers_used in exit_layers and e.entropy <= EXIT_ON.threshold
        else:
            assert e.layers_used == NUM_LAYERS


@pytest.mark.parametrize("variant", ["llama", "qwen2-untied", "gemma2", "llama-sliding"])
def test_cache_after_exits_matches_full_forward(variant):
    """After early exits and a flush, the next full-depth step predicts what mlx-lm's forward over
    the whole sequence predicts: skipped layers were caught up exactly, also in sliding layers."""
    model = sharpen(make_tiny_model(variant))
    loop = LayerLoop(anatomy_of(model), model)
    policy = ExitPolicy.from_settings(EXIT_ON, NUM_LAYERS)
    loop.prefill(PROMPT)
    # Scripted (not greedy) tokens: a sharpened tied model would repeat one token forever.
    fed = random.Random(1).choices(range(256), k=12)
    exits = sum(loop.decode(token, policy).exited for token in fed[:-1])
    assert exits > 0
    loop.flush()
    last = loop.decode(fed[-1], None)

    expected = model(mx.array(PROMPT + fed)[None])[:, -1]
    # Rows batched differently (catch-up rows, one full forward) round differently in fp32.
    assert mx.allclose(last.logits, expected, rtol=1e-4, atol=1e-4)


def test_added_special_token_ids_are_valid_prompt_ids(byte_tokenizer):
    # Regression: ids were bounded by tokenizer.vocab_size, which leaves out added special tokens.
    engine = tiny_engine(make_tiny_model("llama"), byte_tokenizer)
    prompt = (*PROMPT, byte_tokenizer.eos_token_id)
    gen = engine.generate(GenerationRequest(prompt, SamplingParams(max_tokens=1)))
    assert len(list(gen)) == 1
