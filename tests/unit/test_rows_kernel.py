"""The routed ``cblas_sgemm`` computes every BLAS case right: operands transposed or not, padded
strides, alpha and beta, 1 to max_rows() + 1 rows, one column, with every instruction set this
CPU has. Called directly (ctypes, numpy buffers), so strides MLX never produces are covered too."""

import ctypes
import os
import sys

import numpy as np
import pytest

from octomil.blas import route

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the route exists on Linux only")

ROW_MAJOR, NO_TRANS, TRANS = 101, 111, 112
# (k, n): the model's widths, and ragged ones that leave tails in k (vector lanes) and in n
# (register tiles, output blocks) and that are split between the two threads.
SHAPES = ((576, 200), (37, 101))


def _sgemm() -> ctypes._CFuncPtr:
    function = route.library().cblas_sgemm
    pointer, integer, real = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    function.argtypes = [integer] * 6 + [real, pointer, integer, pointer, integer, real]
    function.argtypes += [pointer, integer]
    return function


@pytest.fixture(params=["avx512", "avx2", "generic"])
def isa(request):
    best = route.isa()
    if not route.select_isa(request.param):
        pytest.skip(f"this CPU lacks {request.param}")
    yield request.param
    assert route.select_isa(best)


def _product(rng, rows, k, n, trans_a, trans_b, alpha, beta):
    """Run one routed product on padded buffers; return (result, reference, untouched padding)."""
    a_shape = (k, rows) if trans_a else (rows, k)
    b_shape = (n, k) if trans_b else (k, n)
    a_store = rng.standard_normal((a_shape[0], a_shape[1] + 3), dtype=np.float32)
    b_store = rng.standard_normal((b_shape[0], b_shape[1] + 5), dtype=np.float32)
    c_store = rng.standard_normal((rows, n + 7), dtype=np.float32)
    if beta == 0.0:
        c_store[:, :n] = np.nan  # BLAS does not read c when beta is 0: a NaN there must not leak
    a, b = a_store[:, : a_shape[1]], b_store[:, : b_shape[1]]
    op_a = (a.T if trans_a else a).astype(np.float64)
    op_b = (b.T if trans_b else b).astype(np.float64)
    want = alpha * (op_a @ op_b)
    if beta != 0.0:
        want += beta * c_store[:, :n].astype(np.float64)
    padding = c_store[:, n:].copy()
    _sgemm()(
        ROW_MAJOR,
        TRANS if trans_a else NO_TRANS,
        TRANS if trans_b else NO_TRANS,
        rows,
        n,
        k,
        alpha,
        a_store.ctypes.data,
        a_store.shape[1],
        b_store.ctypes.data,
        b_store.shape[1],
        beta,
        c_store.ctypes.data,
        c_store.shape[1],
    )
    return c_store[:, :n], want, (c_store[:, n:], padding)


@pytest.mark.parametrize("trans_a", [False, True])
@pytest.mark.parametrize("trans_b", [False, True])
def test_routed_products_match_numpy(isa, trans_a, trans_b):
    rng = np.random.default_rng(7)
    for k, n in SHAPES:
        for rows in range(1, route.max_rows() + 2):
            for alpha, beta in ((1.0, 0.0), (-0.75, 1.5)):
                got, want, (padding, before) = _product(
                    rng, rows, k, n, trans_a, trans_b, alpha, beta
                )
                where = f"{isa} rows={rows} k={k} n={n} alpha={alpha} beta={beta}"
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-4, err_msg=where)
                assert np.array_equal(padding, before), f"wrote past ldc: {where}"


@pytest.mark.parametrize("trans_a", [False, True])
@pytest.mark.parametrize("trans_b", [False, True])
def test_one_column_products_match_numpy(isa, trans_a, trans_b):
    # c (m x 1) = op(a) b: m rows of a against one column; m past max_rows() goes to sgemv.
    rng = np.random.default_rng(8)
    for rows in (2, route.max_rows(), 300):
        for alpha, beta in ((1.0, 0.0), (0.5, 2.0)):
            got, want, _ = _product(rng, rows, 576, 1, trans_a, trans_b, alpha, beta)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-4, err_msg=f"rows={rows}")


def test_every_instruction_set_gives_each_row_its_own_bits(isa):
    # The kernel's invariant, without MLX: a row's result is the same alone and in any batch.
    rng = np.random.default_rng(9)
    k, n = 200, 300
    x = rng.standard_normal((route.max_rows(), k), dtype=np.float32)
    w = rng.standard_normal((n, k), dtype=np.float32)
    for trans_b, weights in ((TRANS, w), (NO_TRANS, np.ascontiguousarray(w.T))):
        ldb = weights.shape[1]

        def product(rows: np.ndarray, weights=weights, ldb=ldb, trans_b=trans_b) -> np.ndarray:
            out = np.empty((rows.shape[0], n), dtype=np.float32)
            args = (rows.ctypes.data, k, weights.ctypes.data, ldb, 0.0, out.ctypes.data, n)
            _sgemm()(ROW_MAJOR, NO_TRANS, trans_b, rows.shape[0], n, k, 1.0, *args)
            return out

        alone = np.concatenate([product(x[i : i + 1]) for i in range(len(x))])
        for size in range(2, len(x) + 1):
            assert np.array_equal(product(x[:size]), alone[:size]), (isa, trans_b, size)
            backwards = np.ascontiguousarray(x[:size][::-1])
            assert np.array_equal(product(backwards), alone[:size][::-1]), (isa, trans_b, size)


def test_a_forked_child_computes_without_the_parents_worker():
    # A fork()ed child has no copy of the worker thread: its products must neither wait for it
    # nor come out wrong (uvicorn and multiprocessing fork after the route has run).
    rng = np.random.default_rng(10)
    _product(rng, 8, 576, 1536, False, True, 1.0, 0.0)  # the parent's worker is running
    pid = os.fork()
    if pid == 0:
        got, want, _ = _product(rng, 8, 576, 1536, False, True, 1.0, 0.0)
        os._exit(0 if np.allclose(got, want, rtol=1e-5, atol=2e-4) else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
