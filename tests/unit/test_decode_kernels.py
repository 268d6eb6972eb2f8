"""The decode kernels (``octomil.kernels.decode``) against MLX's own operations.

SwiGLU, RMS norm and one-token attention are compared with MLX references computed another way
(``nn.silu``, ``mx.fast.rms_norm``, a masked softmax over each sequence's own keys, the RoPE
tables' own rotation) on shapes with row tails, every cache width the engine makes and lengths of
1 up to a full buffer; each sequence's result must not depend on the others in the call (batching
stays exact), and strided inputs (which the kernels gather themselves) give their copies' bits.
"""

import octomil  # noqa: F401, I001  (loads OpenBLAS; must precede every mlx import)

import ctypes
import math

import mlx.core as mx
import mlx.nn as nn
import pytest

from octomil.kernels import decode
from octomil.models.rope_table import RopeTables, rotate

ext = decode.extension()
pytestmark = pytest.mark.skipif(ext is None, reason=f"{decode.status()}")
TOL = dict(rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("shape", [(1, 1536), (3, 1536), (2, 13), (1, 1, 7), (5, 64)])
def test_swiglu_matches_silu_times_up(shape):
    mx.random.seed(1)
    gate = mx.random.normal(shape) * 6
    up = mx.random.normal(shape)
    assert mx.allclose(ext.swiglu(gate, up), nn.silu(gate) * up, **TOL)


def test_swiglu_extremes():
    gate = mx.array([[-1e4, -100.0, -88.5, -20.0, 0.0, 20.0, 88.5, 100.0, 1e4]])
    up = mx.ones_like(gate)
    out = ext.swiglu(gate, up)
    assert mx.all(mx.isfinite(out)).item()
    assert mx.allclose(out, nn.silu(gate), rtol=2e-6, atol=1e-30)


def test_swiglu_row_does_not_depend_on_other_rows():
    mx.random.seed(2)
    gate, up = mx.random.normal((9, 37)) * 4, mx.random.normal((9, 37))
    together = ext.swiglu(gate, up)
    for r in range(9):
        assert mx.array_equal(together[r : r + 1], ext.swiglu(gate[r : r + 1], up[r : r + 1]))


@pytest.mark.parametrize("shape", [(1, 576), (3, 576), (2, 13), (1, 1, 37), (5, 64)])
def test_rms_norm_matches_mlx(shape):
    mx.random.seed(3)
    x, w = mx.random.normal(shape) * 3, mx.random.normal(shape[-1:])
    assert mx.allclose(ext.rms_norm(x, w, 1e-5), mx.fast.rms_norm(x, w, 1e-5), **TOL)


def test_rms_norm_row_does_not_depend_on_other_rows_and_strides_are_gathered():
    mx.random.seed(4)
    x, w = mx.random.normal((9, 576)), mx.random.normal((576,))
    together = ext.rms_norm(x, w, 1e-6)
    for r in range(9):
        assert mx.array_equal(together[r : r + 1], ext.rms_norm(x[r : r + 1], w, 1e-6))
    strided = mx.random.normal((576, 4)).T  # (4, 576), column-major
    assert mx.array_equal(ext.rms_norm(strided, w, 1e-6), ext.rms_norm(mx.array(strided), w, 1e-6))
    gate, up = mx.random.normal((64, 3)).T, mx.random.normal((3, 128))[:, ::2]
    assert mx.array_equal(ext.swiglu(gate, up), ext.swiglu(mx.array(gate), mx.array(up)))


def test_rms_norm_rejects_a_weight_of_the_wrong_size():
    with pytest.raises(ValueError, match="rms_norm"):
        ext.rms_norm(mx.ones((2, 8)), mx.ones((7,)), 1e-6)


def reference_attention(q, keys, values, length, scale):
    """q (H, hd) against the first ``length`` rows of keys/values (1, KV, cap, hd)."""
    heads, kv = q.shape[0], keys.shape[1]
    k = mx.repeat(keys[0, :, :length], heads // kv, axis=0)  # (H, L, hd)
    v = mx.repeat(values[0, :, :length], heads // kv, axis=0)
    scores = (q[:, None, :] * scale) @ k.swapaxes(-1, -2)  # (H, 1, L)
    return (mx.softmax(scores, axis=-1, precise=True) @ v)[:, 0]


def step_inputs(lengths, caps, heads=9, kv=3, hd=64, seed=0):
    """Queries, new rows and cache buffers holding ``length - 1`` rows (stale values past them)."""
    mx.random.seed(seed)
    n = len(lengths)
    keys = [mx.random.normal((1, kv, c, hd)) for c in caps]
    values = [mx.random.normal((1, kv, c, hd)) for c in caps]
    for k, v, length in zip(keys, values, lengths, strict=True):
        k[..., length - 1 :, :] = 1e30
        v[..., length - 1 :, :] = math.nan
    mx.eval(keys, values)
    q, k_new, v_new = (mx.random.normal(s) for s in ((n, heads, hd), (n, kv, hd), (n, kv, hd)))
    return q, k_new, v_new, keys, values


def with_new_rows(buffers, rows, lengths):
    out = []
    for i, (b, length) in enumerate(zip(buffers, lengths, strict=True)):
        b = mx.array(b)
        b[0, :, length - 1, :] = rows[i]
        out.append(b)
    return out


@pytest.mark.parametrize("heads,kv,hd", [(9, 3, 64), (4, 2, 16), (4, 4, 12)])
def test_attention_writes_the_rows_then_matches_masked_softmax(heads, kv, hd):
    lengths, caps = [1, 7, 256, 300, 513], [256, 256, 256, 512, 768]
    q, k_new, v_new, keys, values = step_inputs(lengths, caps, heads, kv, hd)
    expected_k = with_new_rows(keys, k_new, lengths)
    expected_v = with_new_rows(values, v_new, lengths)
    out, *buffers = ext.decode_attention(
        q, k_new, v_new, keys, values, [1] * len(lengths), lengths, hd**-0.5
    )
    n = len(lengths)
    for i, length in enumerate(lengths):
        rows = slice(0, length)
        assert mx.array_equal(buffers[i][..., rows, :], expected_k[i][..., rows, :])
        assert mx.array_equal(buffers[n + i][..., rows, :], expected_v[i][..., rows, :])
        expected = reference_attention(q[i], expected_k[i], expected_v[i], length, hd**-0.5)
        assert mx.allclose(out[i], expected, rtol=1e-5, atol=1e-5), (i, length)


@pytest.mark.parametrize(
    "lengths,caps",
    [
        ([5, 130, 257, 40], [256, 256, 512, 256]),
        # 16 sequences at ~300 positions: the step's attention is split over two threads (each
        # job whole on one); each sequence alone stays on one thread.
        ([280 + 7 * i for i in range(16)], [512] * 16),
    ],
)
def test_attention_sequence_does_not_depend_on_neighbours(lengths, caps):
    n = len(lengths)
    q, k_new, v_new, keys, values = step_inputs(lengths, caps)
    together = ext.decode_attention(q, k_new, v_new, keys, values, [1] * n, lengths, 0.125)[0]
    for i in range(n):
        one = slice(i, i + 1)
        alone = ext.decode_attention(
            q[one], k_new[one], v_new[one], [keys[i]], [values[i]], [1], [lengths[i]], 0.125
        )[0]
        assert mx.array_equal(together[one], alone)


def test_a_segment_of_rows_equals_its_rows_decoded_one_by_one():
    """Regression guard for verification and catch-up rows: row j of a segment attends to the
    keys up to its own position, with the bits a one-row step at that position gets."""
    length, rows = 40, 5  # the segment's rows go at positions 35..39
    q, k_new, v_new, keys, values = step_inputs([length - rows + 1], [256])
    q, k_new, v_new = (mx.random.normal((rows, *a.shape[1:])) for a in (q, k_new, v_new))
    out, k_all, v_all = ext.decode_attention(q, k_new, v_new, keys, values, [rows], [length], 0.125)
    k_buf, v_buf = keys[0], values[0]
    for j in range(rows):
        one = slice(j, j + 1)
        step, k_buf, v_buf = ext.decode_attention(
            q[one], k_new[one], v_new[one], [k_buf], [v_buf], [1], [length - rows + j + 1], 0.125
        )
        assert mx.array_equal(out[one], step)
    assert mx.array_equal(k_all[..., :length, :], k_buf[..., :length, :])
    assert mx.array_equal(v_all[..., :length, :], v_buf[..., :length, :])


def test_attention_reads_a_strided_buffer():
    """A cache buffer that is a view (mlx-lm slices one when it grows) is copied, not misread."""
    q, k_new, v_new, keys, values = step_inputs([3], [512])
    view_k, view_v = keys[0][..., :256, :], values[0][..., :256, :]
    out, k_out, _ = ext.decode_attention(q, k_new, v_new, [view_k], [view_v], [1], [3], 0.125)
    expected_k = with_new_rows([view_k], k_new, [3])[0]
    expected_v = with_new_rows([view_v], v_new, [3])[0]
    assert mx.array_equal(k_out[..., :3, :], expected_k[..., :3, :])
    expected = reference_attention(q[0], expected_k, expected_v, 3, 0.125)
    assert mx.allclose(out[0], expected, rtol=1e-5, atol=1e-5)


def address(a: mx.array) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(memoryview(a)))


def test_attention_appends_to_the_cache_buffer_in_place():
    """The new rows are written into the buffer itself, not a copy of the whole cache (a copy a
    step cost ~0.4 GB of memory traffic at 16 sequences); the rows before stay as they were."""
    q, k_new, v_new, keys, values = step_inputs([5, 300], [256, 512])
    before = [mx.array(b[..., :299, :]) for b in (*keys, *values)]
    mx.eval(before)
    _, *buffers = ext.decode_attention(q, k_new, v_new, keys, values, [1, 1], [5, 300], 0.125)
    mx.eval(buffers)
    assert [address(b) for b in buffers] == [address(b) for b in (*keys, *values)]
    for old, new, length in zip(before, buffers, [5, 300, 5, 300], strict=True):
        assert mx.array_equal(old[..., : length - 1, :], new[..., : length - 1, :])


def test_attention_rejects_a_length_past_the_buffer():
    q, k_new, v_new, keys, values = step_inputs([4], [256])
    with pytest.raises(ValueError, match="does not fit"):
        ext.decode_attention(q, k_new, v_new, keys, values, [1], [257], 0.125)


def test_disabled_turns_the_kernels_off():
    with decode.disabled():
        assert decode.extension() is None
    assert decode.extension() is ext


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma"])
def test_decode_steps_take_the_kernels_on_plain_families(family, byte_tokenizer, monkeypatch):
    """Regression guard: the batched decode path must reach the kernels (or the speed-up is
    silently gone), and only on families whose attention they compute."""
    from tiny_models import make_tiny_model, tiny_engine

    from octomil.engine.scheduler import Scheduler, SchedulerConfig
    from octomil.engine.types import GenerationRequest, SamplingParams

    calls = {"attention": [], "swiglu": 0}
    attention, swiglu = ext.decode_attention, ext.swiglu

    def counting_attention(q, k, v, keys, values, rows, lengths, scale, rope):
        calls["attention"].append(len(lengths))
        return attention(q, k, v, keys, values, rows, lengths, scale, rope)

    def counting_swiglu(gate, up):
        calls["swiglu"] += 1
        return swiglu(gate, up)

    monkeypatch.setattr(ext, "decode_attention", counting_attention)
    monkeypatch.setattr(ext, "swiglu", counting_swiglu)
    engine = tiny_engine(make_tiny_model(family), byte_tokenizer)
    scheduler = Scheduler(SchedulerConfig(max_batch_size=3))
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    for prompt in ([1, 2, 3], [4, 5, 6, 7, 8], [9]):
        scheduler.submit(engine.generate(GenerationRequest(tuple(prompt), params)))
    while not scheduler.idle:
        scheduler.step()

    if family == "gemma":  # gelu MLP and its own attention: the family's code throughout
        assert calls == {"attention": [], "swiglu": 0}
    else:
        assert 3 in calls["attention"] and calls["swiglu"] > 0


def test_a_bfloat16_model_decodes_through_the_family_code(byte_tokenizer):
    """Regression: the float32-only attention kernel was chosen for bfloat16 activations
    (--dtype bfloat16) and failed the step."""
    from tiny_models import make_tiny_model, tiny_engine

    from octomil.engine.scheduler import Scheduler, SchedulerConfig
    from octomil.engine.types import GenerationRequest, SamplingParams

    model = make_tiny_model("llama")
    model.set_dtype(mx.bfloat16)
    engine = tiny_engine(model, byte_tokenizer)
    scheduler = Scheduler(SchedulerConfig(max_batch_size=2))
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    gens = [engine.generate(GenerationRequest((1, 2, 3), params)) for _ in range(2)]
    for gen in gens:
        scheduler.submit(gen)
    while not scheduler.idle:
        scheduler.step()
    assert [len(g.output_tokens) for g in gens] == [3, 3]


@pytest.mark.parametrize("traditional", [False, True])
def test_rope_in_the_kernel_equals_the_tables_rotation(traditional):
    """The kernel rotates q and k (projections as they come: (1, R, H * hd)) with the step's
    tables and scales q: the attention and the cache rows of rotating first (the tables' own
    rotation) and passing no tables."""
    heads, kv, hd, lengths = 9, 3, 64, [3, 40, 200]
    n = len(lengths)
    q, k_new, v_new, keys, values = step_inputs(lengths, [256] * n, heads, kv, hd, seed=5)
    tables = RopeTables(hd, traditional, 10000.0, 1.0)
    cos, sin, partner = tables.rows(tuple(length - 1 for length in lengths), hd)
    out, *buffers = ext.decode_attention(
        q.reshape(1, n, heads * hd),
        k_new.reshape(1, n, kv * hd),
        v_new.reshape(1, n, kv * hd),
        keys,
        values,
        [1] * n,
        lengths,
        0.125,
        [cos, sin, partner],
    )
    assert out.shape == (1, n, heads * hd)
    c, s_ = cos[:, None, :], sin[:, None, :]  # (R, 1, hd) against (R, H, hd)
    want, *want_buffers = ext.decode_attention(
        rotate(q, c, s_, partner), rotate(k_new, c, s_, partner), v_new, keys, values, [1] * n,
        lengths, 0.125,
    )  # fmt: skip
    assert mx.allclose(out.reshape(n, heads, hd), want, **TOL)
    for got, expected, length in zip(buffers, want_buffers, lengths * 2, strict=True):
        assert mx.allclose(got[..., :length, :], expected[..., :length, :], **TOL)


def test_strided_projections_give_their_copies_bits():
    heads, kv, hd, lengths = 4, 2, 16, [5, 9]
    q, k_new, v_new, keys, values = step_inputs(lengths, [256, 256], heads, kv, hd, seed=6)
    q_strided = mx.random.normal((heads * hd, 2)).T  # (2, H * hd), column-major
    tables = RopeTables(hd, False, 10000.0, 1.0)
    rope = list(tables.rows((4, 8), hd))
    args = (keys, values, [1, 1], lengths, 0.25, rope)
    strided = ext.decode_attention(q_strided, k_new, v_new, *args)[0]
    copied = ext.decode_attention(mx.array(q_strided), k_new, v_new, *args)[0]
    assert mx.array_equal(strided, copied)


def test_attention_rejects_tables_of_the_wrong_shape():
    q, k_new, v_new, keys, values = step_inputs([5], [256], 4, 2, 16)
    cos = mx.ones((2, 16))  # two rows of tables for one query row
    with pytest.raises(ValueError, match="rope"):
        ext.decode_attention(
            q,
            k_new,
            v_new,
            keys,
            values,
            [1],
            [5],
            0.25,
            [cos, cos, mx.arange(16, dtype=mx.uint32)],
        )


def test_packed_rows_give_the_separate_inputs_bits():
    """A fused product's rows: swiglu(gate|up) and attention over q|k|v rows."""
    mx.random.seed(7)
    gate, up = mx.random.normal((3, 40)), mx.random.normal((3, 40))
    packed = mx.concatenate([gate, up], axis=-1)
    assert mx.array_equal(ext.swiglu(packed), ext.swiglu(gate, up))
    heads, kv, hd, lengths = 4, 2, 16, [5, 9]
    rope = list(RopeTables(hd, False, 10000.0, 1.0).rows((4, 8), hd))
    results = []
    for packed in (True, False):  # each on its own buffers: the kernel appends in place
        q, k_new, v_new, keys, values = step_inputs(lengths, [256, 256], heads, kv, hd, seed=8)
        rows = [r.reshape(2, -1) for r in (q, k_new, v_new)]
        args = (keys, values, [1, 1], lengths, 0.25, rope)
        if packed:
            results.append(
                ext.decode_attention(mx.concatenate(rows, axis=-1)[None], None, None, *args)
            )
        else:
            results.append(ext.decode_attention(*rows, *args))
        mx.eval(results[-1])
    together, apart = results
    assert together[0].shape == (1, 2, heads * hd)
    assert mx.array_equal(together[0][0], apart[0])
    for a, b, length in zip(together[1:], apart[1:], lengths * 2, strict=True):
        assert mx.array_equal(a[..., :length, :], b[..., :length, :])
    with pytest.raises(ValueError, match="both, or neither"):
        ext.decode_attention(rows[0], rows[1], None, *args)
