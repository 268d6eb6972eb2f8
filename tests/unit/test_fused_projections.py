"""Fused q/k/v and gate/up products of compact weights (``octomil.quant.fused``).

Pinned: every attention and SwiGLU MLP of a compact model gets one; its columns are bitwise the
separate products' for every few-row count (the kernel computes each output alone); the separate
modules read views of the fused weights (one copy, counted once in the parameters); and decoding
(one sequence, and three batched through the scheduler) gives the logits and tokens of the same
model without fusion, bit for bit, on a family without biases and one with q/k/v biases.
"""

import octomil  # noqa: F401, I001  (loads OpenBLAS; must precede every mlx import)

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from tiny_models import make_tiny_model, tiny_engine

from octomil.engine.scheduler import Scheduler, SchedulerConfig
from octomil.engine.types import GenerationRequest, SamplingParams
from octomil.models.layout import convert_precision
from octomil.quant import kernel
from octomil.quant.fused import GATE_UP, QKV, fused_of

pytestmark = pytest.mark.skipif(not kernel.available(), reason=kernel.reason())

FAMILIES = ["llama", "qwen2"]  # qwen2: q/k/v with biases


def _compact(family: str, fmt: str):
    model = make_tiny_model(family)
    convert_precision(model, fmt)
    return model


def _unfuse(model) -> None:
    for _, module in model.named_modules():
        module.__dict__.pop("fused", None)


@pytest.mark.parametrize("fmt", ["q4", "q8"])
@pytest.mark.parametrize("family", FAMILIES)
def test_fused_columns_are_the_separate_products(family, fmt):
    model = _compact(family, fmt)
    layers = model.model.layers
    assert all(fused_of(layer.self_attn, QKV) for layer in layers)
    assert all(fused_of(layer.mlp, GATE_UP) for layer in layers)
    for module, names in ((layers[0].self_attn, QKV), (layers[-1].mlp, GATE_UP)):
        fused = fused_of(module, names)
        for rows in (1, 2, 5, 8, 9, kernel.max_rows()):
            x = mx.random.normal((1, rows, fused.weight.shape[1] * 32 // fused.bits))
            for part, name in zip(fused.split(fused(x)), names, strict=True):
                assert mx.array_equal(part, module[name](x)), (name, rows)


def test_separate_modules_read_views_of_the_fused_weights():
    model = _compact("llama", "q4")
    attention = model.model.layers[0].self_attn
    fused = fused_of(attention, QKV)
    start = 0
    for name in QKV:
        part = attention[name]
        rows = part.weight.shape[0]
        assert mx.array_equal(part.weight, fused.weight[start : start + rows])
        assert mx.array_equal(part.scales, fused.scales[start : start + rows])
        start += rows
    assert start == fused.weight.shape[0]
    names = {k for k, _ in tree_flatten(model.parameters())}
    assert not any("fused" in k for k in names)  # not parameters: bytes are counted once


def _decode_logits(engine, prompt: list[int], steps: int) -> list[mx.array]:
    from octomil.engine.layer_loop import LayerLoop

    loop = LayerLoop(engine.loaded.anatomy, engine.loaded.model)
    logits = [loop.prefill(prompt)]
    for token in range(steps):
        logits.append(loop.decode(token + 5, None).logits)
    mx.eval(logits)
    return logits


@pytest.mark.parametrize("family", FAMILIES)
def test_decoding_is_bitwise_the_unfused_models(family, byte_tokenizer):
    fused = tiny_engine(_compact(family, "q4"), byte_tokenizer)
    plain_model = _compact(family, "q4")
    _unfuse(plain_model)
    plain = tiny_engine(plain_model, byte_tokenizer)
    for a, b in zip(
        _decode_logits(fused, [1, 2, 3, 4], 6), _decode_logits(plain, [1, 2, 3, 4], 6), strict=True
    ):
        assert mx.array_equal(a, b)
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    prompts = ([1, 2, 3], [4, 5, 6, 7, 8], [9])
    tokens = []
    for engine in (fused, plain):
        scheduler = Scheduler(SchedulerConfig(max_batch_size=3))
        gens = [engine.generate(GenerationRequest(tuple(p), params)) for p in prompts]
        for gen in gens:
            scheduler.submit(gen)
        while not scheduler.idle:
            scheduler.step()
        tokens.append([g.output_tokens for g in gens])
    assert all(len(t) == 6 for t in tokens[0])
    assert tokens[0] == tokens[1]
