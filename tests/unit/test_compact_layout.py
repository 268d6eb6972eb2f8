"""``--dtype q8|q4`` (``octomil.quant.modules``): the model's products on Octomil's kernel.

Pinned: the same logits as mlx's own quantized modules on the same weights (MLX's product, within
fp32 rounding: 1e-4 of the logits' scale, with a kernel on fp32 activations: the int8 kernels'
rounding of the inputs is bounded product by product in test_qmm_kernel.py), a 4-bit checkpoint
kept bit for bit under q4, its
4-bit levels held under q8, the head at 8 bits, the float32 fallback without the kernel, and (in a
fresh process) that every projection and the head of a forward pass run the kernel."""

import octomil  # noqa: F401, I001  (loads OpenBLAS; must precede every mlx import)

import os
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
from fresh_python import run_python
from tiny_models import make_tiny_model

from octomil.models.layout import apply_layout, choose_layout, convert_precision
from octomil.quant import kernel
from octomil.quant.modules import CompactEmbedding, CompactLinear

pytestmark = pytest.mark.skipif(not kernel.available(), reason=kernel.reason())


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("OCTOMIL_CACHE", str(tmp_path))  # layout decisions of this test only


def _logits(model: nn.Module, tokens: mx.array) -> mx.array:
    return model(tokens)


@pytest.fixture
def float_activations():
    """The fastest kernel on fp32 activations this CPU has, for this test only."""
    best = kernel.isa()
    assert any(kernel.select_isa(name) for name in ("avx512", "avx2", "generic"))
    yield
    assert kernel.select_isa(best)


@pytest.mark.parametrize("fmt", ["q8", "q4"])
@pytest.mark.parametrize("family", ["llama", "mistral"])  # tied head, untied lm_head
def test_logits_match_mlx_quantized_modules_on_the_same_weights(fmt, family, float_activations):
    ours, stock = make_tiny_model(family), make_tiny_model(family)
    convert_precision(ours, fmt)
    convert_precision(stock, fmt, stock=True)
    assert any(isinstance(m, CompactLinear) for _, m in ours.named_modules())
    assert not any(isinstance(m, CompactLinear) for _, m in stock.named_modules())
    for length in (1, 3, 32, 40):  # decode, few rows, the kernel's limit, prefill via sgemm
        tokens = mx.arange(length).reshape(1, length) % 50 + 1
        want, got = _logits(stock, tokens), _logits(ours, tokens)
        scale = mx.abs(want).max().item()
        assert mx.abs(got - want).max().item() <= 1e-4 * scale


def _fp16_q4_checkpoint() -> nn.Module:
    """A 4-bit checkpoint with fp16 scales and biases, as mx.load makes of a GGUF's Q4_1."""
    model = make_tiny_model("llama")
    nn.quantize(model, group_size=32, bits=4)
    model.set_dtype(mx.float16)
    return model


def test_q4_keeps_a_4bit_checkpoint_bit_for_bit_and_its_head_bits():
    """Pins Q4_1's bytes under q4: codes, fp16 scales and fp16 biases unchanged (fp32 scales read
    17% more bytes per token)."""
    model = _fp16_q4_checkpoint()
    before = {k: v for k, v in model.parameters()["model"]["layers"][0]["mlp"]["up_proj"].items()}
    apply_layout(model, choose_layout(model, "q4"))
    up = model.model.layers[0].mlp.up_proj
    assert isinstance(up, CompactLinear) and up.bits == 4
    assert mx.array_equal(up.weight, before["weight"])
    for key in ("scales", "biases"):
        assert up[key].dtype == mx.float16 and mx.array_equal(up[key], before[key])
    head = model.model.embed_tokens
    assert isinstance(head, CompactEmbedding) and head.bits == 4  # the checkpoint's own bits


def _dense(p: nn.Module) -> mx.array:
    f32 = (p.scales.astype(mx.float32), p.biases.astype(mx.float32))
    return mx.dequantize(p.weight, *f32, group_size=p.group_size, bits=p.bits)


def test_q8_holds_every_4bit_level():
    """4-bit weights under q8: level 16 q at step s / 16, every weight kept bit for bit (fp16)."""
    model = _fp16_q4_checkpoint()
    four = _dense(model.model.layers[0].mlp.up_proj)
    convert_precision(model, "q8")
    q = model.model.layers[0].mlp.up_proj
    assert q.bits == 8 and q.group_size == 32 and q.scales.dtype == mx.float16
    assert mx.array_equal(_dense(q), four)


def test_a_float_model_gets_an_8bit_head_under_q4():
    model = make_tiny_model("llama")
    convert_precision(model, "q4")
    assert model.model.layers[0].self_attn.q_proj.bits == 4
    assert model.model.embed_tokens.bits == 8


def test_without_the_kernel_q4_is_served_as_float32(monkeypatch):
    monkeypatch.setattr(kernel, "available", lambda: False)
    monkeypatch.setattr(kernel, "reason", lambda: "no cmake to build it")
    model = make_tiny_model("llama")
    choice = apply_layout(model, choose_layout(model, "q4"))
    assert choice.layout == "float32"
    assert "q4 unavailable: no cmake to build it" in choice.describe("float32")
    assert not any(isinstance(m, CompactLinear) for _, m in model.named_modules())


def test_a_fresh_process_runs_every_product_on_the_kernel():
    """One decode-sized forward of a 2-layer tiny model: 7 projections per layer + the head,
    all on the few-row kernel; a 40-token prefill: all of them dequantize-and-sgemm."""
    code = (
        "import octomil, mlx.core as mx\n"
        "from tiny_models import make_tiny_model, NUM_LAYERS\n"
        "from octomil.models.layout import convert_precision\n"
        "from octomil.quant import kernel\n"
        "m = make_tiny_model('llama'); convert_precision(m, 'q4')\n"
        "mx.eval(m(mx.array([[1]])))\n"
        "print(kernel.calls() == 7 * NUM_LAYERS + 1, kernel.calls(prefill=True))\n"
        "mx.eval(m(mx.arange(40).reshape(1, 40)))\n"
        "print(kernel.calls(prefill=True) == 7 * NUM_LAYERS + 1)\n"
    )
    here = str(Path(__file__).parent)
    path = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)
    assert run_python(code, env={"PYTHONPATH": path}) == ["True 0", "True"]
