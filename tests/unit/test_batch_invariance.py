"""A row's product has the same bits alone and inside any batch of up to max_rows() rows, at any
position, through ``mx.matmul`` with the route active: what continuous batching relies on for a
sequence's greedy output to equal the same request served alone."""

import sys

import numpy as np
import pytest

from octomil.blas import route

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the route exists on Linux only")

import mlx.core as mx  # noqa: E402  (after octomil: the route must be loaded before mlx)

# (in, out): gate/up, down, and an LM-head-like matrix.
SHAPES = ((576, 1536), (1536, 576), (576, 4096))


@pytest.mark.parametrize("k, n", SHAPES)
@pytest.mark.parametrize("layout", ["out_in", "in_out"])
def test_each_row_has_the_same_bits_alone_and_in_every_batch(k, n, layout):
    rng = np.random.default_rng(k + n)
    limit = route.max_rows()
    x = rng.standard_normal((limit + 1, k), dtype=np.float32)
    w = mx.array(rng.standard_normal((n, k) if layout == "out_in" else (k, n), dtype=np.float32))

    def product(rows: np.ndarray) -> np.ndarray:
        out = mx.array(rows) @ (w.T if layout == "out_in" else w)
        mx.eval(out)
        return np.array(out)

    before = route.routed_calls()
    alone = np.concatenate([product(x[i : i + 1]) for i in range(limit + 1)])
    for size in range(2, limit + 1):
        assert np.array_equal(product(x[:size]), alone[:size]), f"rows 0..{size - 1}"
        flipped = np.ascontiguousarray(x[:size][::-1])  # every row at another index
        assert np.array_equal(product(flipped), alone[:size][::-1]), f"rows {size - 1}..0"
    assert route.routed_calls() == before + (limit + 1) + 2 * (limit - 1)

    # One row more leaves the route (OpenBLAS's sgemm, summed another way): a batching scheduler
    # caps its products at max_rows() rows.
    past = product(x)
    assert route.routed_calls() == before + (limit + 1) + 2 * (limit - 1)
    np.testing.assert_allclose(past, alone, rtol=1e-4, atol=1e-3)
