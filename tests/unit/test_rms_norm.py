"""Compiled RMS norm gives mx.fast.rms_norm's numbers; it replaces exactly nn.RMSNorm."""

import octomil  # noqa: F401, I001  (loads OpenBLAS; must precede every mlx import)

import mlx.core as mx
import mlx.nn as nn
import pytest
from tiny_models import SUPPORTED, make_tiny_model

from octomil.models.rms_norm import CompiledRMSNorm, install_compiled_rms_norm


@pytest.mark.parametrize("shape", [(1, 1, 576), (1, 5, 576), (2, 3, 64), (1, 40, 576)])
def test_matches_fast_rms_norm(shape):
    norm = nn.RMSNorm(shape[-1], eps=1e-5)
    norm.weight = mx.random.normal((shape[-1],), key=mx.random.key(1))
    x = 3 * mx.random.normal(shape, key=mx.random.key(2))
    got = CompiledRMSNorm(norm)(x)
    assert mx.allclose(got, norm(x), rtol=1e-6, atol=1e-6)


def test_half_precision_keeps_the_float32_accumulating_fallback():
    norm = nn.RMSNorm(64)
    norm.set_dtype(mx.bfloat16)
    x = mx.random.normal((1, 2, 64)).astype(mx.bfloat16)
    assert mx.array_equal(CompiledRMSNorm(norm)(x), norm(x))


@pytest.mark.parametrize("family", SUPPORTED)
def test_installed_where_rms_norms_were_and_logits_unchanged(family):
    reference, model = make_tiny_model(family), make_tiny_model(family)
    plain = sum(type(m) is nn.RMSNorm for _, m in model.named_modules())
    assert install_compiled_rms_norm(model) == plain
    assert not any(type(m) is nn.RMSNorm for _, m in model.named_modules())
    tokens = mx.array([[1, 2, 3, 4, 5]])
    assert mx.allclose(model(tokens), reference(tokens), rtol=1e-5, atol=1e-5)
    # Same parameter tree: weights load and save under the same names.
    assert {k for k, _ in nn.utils.tree_flatten(model.parameters())} == {
        k for k, _ in nn.utils.tree_flatten(reference.parameters())
    }
