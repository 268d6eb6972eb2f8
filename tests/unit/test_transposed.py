"""(in, out) weight storage (``octomil.models.transposed``) decodes exactly like stock mlx-lm."""

import octomil  # noqa: F401, I001  (loads OpenBLAS; must precede every mlx import)

import random

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm.generate import generate_step
from tiny_models import make_tiny_model, tiny_engine

from octomil.engine.types import GenerationRequest, SamplingParams
from octomil.models.layout import LayoutChoice, apply_layout
from octomil.models.transposed import TransposedEmbedding, TransposedLinear, transpose_for_decode

PROMPT = random.Random(2).choices(range(256), k=9)
GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


@pytest.mark.parametrize("variant", ["llama", "llama-untied", "gemma", "phi3", "qwen3"])
def test_transposed_greedy_equals_stock(variant, byte_tokenizer):
    stock = make_tiny_model(variant)
    ours = make_tiny_model(variant)  # same seed: same weights
    transpose_for_decode(ours)
    assert any(isinstance(m, TransposedLinear) for _, m in ours.named_modules())
    want = [int(t) for t, _ in generate_step(mx.array(PROMPT), stock, max_tokens=24)]
    got = [
        e.token_id
        for e in tiny_engine(ours, byte_tokenizer).generate(
            GenerationRequest(tuple(PROMPT), GREEDY)
        )
    ]
    assert got == want


def test_tied_embedding_becomes_transposed_embedding():
    model = make_tiny_model("llama")
    transpose_for_decode(model)
    assert isinstance(model.model.embed_tokens, TransposedEmbedding)
    assert not any(type(m) is nn.Linear for _, m in model.named_modules())


def test_apply_layout_records_the_storage_measurement(tmp_path, monkeypatch):
    monkeypatch.setenv("OCTOMIL_CACHE", str(tmp_path))  # a fresh decision, not the user's
    model = make_tiny_model("llama")
    choice = apply_layout(model, LayoutChoice("native", {}, measured=False))
    assert choice.storage_ms is not None and len(choice.storage_ms) == 2
    kinds = {type(m) for _, m in model.named_modules()}
    assert (TransposedLinear in kinds) == choice.transposed
