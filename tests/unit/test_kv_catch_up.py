"""KV-cache correctness after skipped layers (deferred catch-up, ``octomil.engine.catch_up``).

Reference: the model's own full-depth forward pass over the same tokens (``model(tokens)``), which
never skips anything. Exits are scripted per step with a policy whose threshold always passes.
"""

import math

import mlx.core as mx
import pytest
from mlx_lm.models import llama

from octomil.engine.catch_up import MAX_PENDING_ROWS
from octomil.engine.exit_policy import ExitPolicy
from octomil.engine.layer_loop import LayerLoop
from octomil.models.anatomy import anatomy_of

LAYERS = 6
TOL = dict(atol=1e-4, rtol=1e-4)  # rows batched differently round differently in fp32


@pytest.fixture(scope="module")
def model():
    mx.random.seed(0)
    args = llama.ModelArgs(
        model_type="llama",
        hidden_size=64,
        num_hidden_layers=LAYERS,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        vocab_size=256,
    )
    m = llama.Model(args)
    mx.eval(m.parameters())
    return m


def exit_after(depth: int | None) -> ExitPolicy | None:
    """A policy that exits right after ``depth`` layers (None: full depth)."""
    if depth is None:
        return None
    return ExitPolicy(threshold=math.inf, min_layers=1, exit_layers=(depth,), total_layers=LAYERS)


def reference_logits(model, tokens: list[int]) -> mx.array:
    return model(mx.array([tokens]))[0]  # (L, vocab): position i predicts token i+1


PROMPT = [5, 17, 42, 99, 3, 250, 7]
FED = [11, 23, 35, 47, 59, 61, 73, 85, 97, 109]
# Exit depth per decode step; covers: exit then full depth, consecutive exits at rising and falling
# depths (rows joining out of position order), and exit at the first/last checkable layers.
SCRIPT = [2, None, 4, 2, None, 1, 5, 3, None, None]


def test_full_depth_steps_after_exits_match_reference(model):
    """Regression: a token attending to a layer an earlier token skipped must see exact K/V."""
    loop = LayerLoop(anatomy_of(model), model)
    logits = loop.prefill(PROMPT)
    ref = reference_logits(model, PROMPT + FED)
    assert mx.allclose(logits[0], ref[len(PROMPT) - 1], **TOL)
    for step, (token, depth) in enumerate(zip(FED, SCRIPT)):
        result = loop.decode(token, exit_after(depth))
        position = len(PROMPT) + step
        if depth is None:
            assert result.depth == LAYERS and not result.exited
            assert mx.allclose(result.logits[0], ref[position], **TOL), f"step {step}"
        else:
            assert result.depth == depth and result.exited


def test_exited_logits_come_from_the_exit_layer(model):
    """The head evaluated at the exit layer is the emitted distribution (no second evaluation)."""
    anatomy = anatomy_of(model)
    loop = LayerLoop(anatomy, model)
    loop.prefill(PROMPT)
    result = loop.decode(FED[0], exit_after(3))
    h = anatomy.embed(mx.array([PROMPT + FED[:1]]))
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    for layer, c in zip(anatomy.layers[:3], cache):
        h = layer(h, "causal", c)
    assert mx.allclose(result.logits[0], anatomy.logits(h[:, -1])[0], **TOL)


def test_flush_leaves_the_full_depth_cache(model):
    loop = LayerLoop(anatomy_of(model), model)
    loop.prefill(PROMPT)
    fed = FED[:8]  # SCRIPT[:8] ends on two exits, so rows are pending before the flush
    for token, depth in zip(fed, SCRIPT):
        loop.decode(token, exit_after(depth))
    assert loop.pending
    loop.flush()
    assert not loop.pending

    from mlx_lm.models.cache import make_prompt_cache

    ref_cache = make_prompt_cache(model)
    model(mx.array([PROMPT + fed]), cache=ref_cache)
    n = len(PROMPT) + len(fed)
    for i, (got, want) in enumerate(zip(loop.cache, ref_cache)):
        assert got.offset == want.offset == n, f"layer {i}"
        assert mx.allclose(got.keys[..., :n, :], want.keys[..., :n, :], **TOL), f"keys, layer {i}"
        assert mx.allclose(got.values[..., :n, :], want.values[..., :n, :], **TOL), (
            f"values, layer {i}"
        )


def test_cache_offsets_track_pending_rows(model):
    """Invariant: layer j lacks exactly the pending positions with start_layer <= j."""
    loop = LayerLoop(anatomy_of(model), model)
    loop.prefill(PROMPT)
    loop.decode(FED[0], exit_after(4))  # position p misses layers 4..5
    loop.decode(FED[1], exit_after(2))  # p misses 4..5 (not joined yet), p+1 misses 2..5
    p = len(PROMPT)
    assert [r.start_layer for r in sorted(loop.pending, key=lambda r: r.position)] == [4, 2]
    assert [c.offset for c in loop.cache] == [p + 2, p + 2, p + 1, p + 1, p, p]


def test_pending_rows_are_bounded(model):
    """After MAX_PENDING_ROWS consecutive exits the next token runs full depth and flushes all."""
    loop = LayerLoop(anatomy_of(model), model)
    loop.prefill(PROMPT)
    depths = [loop.decode(t, exit_after(2)).depth for t in FED[: MAX_PENDING_ROWS + 1]]
    assert depths == [2] * MAX_PENDING_ROWS + [LAYERS]
    assert not loop.pending
    n = len(PROMPT) + MAX_PENDING_ROWS + 1
    assert all(c.offset == n for c in loop.cache)
