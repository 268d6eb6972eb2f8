"""Few-row fp32 products go through sgemv, give the same numbers, and the route degrades cleanly."""

import os
import sys
import textwrap

import numpy as np
import pytest
from fresh_python import run_python

from octomil import blas, gemv_route

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the route exists on Linux only")

import mlx.core as mx  # noqa: E402  (after octomil: the route must be loaded before mlx)


def test_route_is_active_and_counts_few_row_products():
    assert gemv_route.active(), gemv_route.reason()
    assert "few-row products via sgemv" in blas.describe()
    a, b = mx.random.normal((1, 64)), mx.random.normal((64, 96))
    mx.eval(a, b)
    before = gemv_route.routed_calls()
    mx.eval(a @ b)
    assert gemv_route.routed_calls() == before + 1
    square = mx.random.normal((8, 64))
    mx.eval(square)
    mx.eval(square[:3] @ b)  # three rows (decode + catch-up rows): one sgemv per row
    assert gemv_route.routed_calls() == before + 2
    mx.eval(square @ b)  # eight rows: OpenBLAS's sgemm, not the route
    assert gemv_route.routed_calls() == before + 2


def test_disabled_block_sends_products_to_sgemm():
    a, b = mx.random.normal((1, 64)), mx.random.normal((64, 96))
    mx.eval(a, b)
    before = gemv_route.routed_calls()
    with gemv_route.disabled():
        off = a @ b
        mx.eval(off)
    assert gemv_route.routed_calls() == before
    on = a @ b
    mx.eval(on)
    assert gemv_route.routed_calls() == before + 1
    assert mx.allclose(on, off, rtol=1e-5, atol=1e-5)


def _close(got: mx.array, want: np.ndarray) -> None:
    np.testing.assert_allclose(np.array(got), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rows", [1, 3, 4, 5])
@pytest.mark.parametrize("transpose_a", [False, True])
@pytest.mark.parametrize("transpose_b", [False, True])
def test_few_row_and_one_column_products_match_numpy(rows, transpose_a, transpose_b):
    rng = np.random.default_rng(rows)
    k, n = 576, 1536
    a = rng.standard_normal((k, rows) if transpose_a else (rows, k)).astype(np.float32)
    b = rng.standard_normal((n, k) if transpose_b else (k, n)).astype(np.float32)
    op_a = mx.array(a).T if transpose_a else mx.array(a)
    op_b = mx.array(b).T if transpose_b else mx.array(b)
    ref_a = a.T.astype(np.float64) if transpose_a else a.astype(np.float64)
    ref_b = b.T.astype(np.float64) if transpose_b else b.astype(np.float64)
    _close(op_a @ op_b, ref_a @ ref_b)  # rows: c_r = op(b)^T a_r
    if rows == 1:
        _close(op_b.T @ op_a.T, (ref_a @ ref_b).T)  # one column: c = op(b)^T x


def test_addmm_batched_and_strided_operands_match_numpy():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((300, 200)).astype(np.float32)
    bias = rng.standard_normal((300,)).astype(np.float32)
    x = rng.standard_normal((4, 1, 200)).astype(np.float32)
    wide = rng.standard_normal((200, 7)).astype(np.float32)
    ref = x.astype(np.float64) @ w.T.astype(np.float64)
    # addmm(c, a, b, alpha, beta) = alpha * a @ b + beta * c
    _close(
        mx.addmm(mx.array(bias), mx.array(x[0]), mx.array(w).T, 0.5, 2.0), 0.5 * ref[0] + 2 * bias
    )
    _close(mx.array(x) @ mx.array(w).T, ref)  # a batch of one-row products
    _close(mx.array(wide)[:, 3:4].T @ mx.array(w).T, wide[:, 3:4].T.astype(np.float64) @ w.T)


def _probe(env: dict[str, str]) -> list[str]:
    code = textwrap.dedent(
        """
        import octomil, mlx.core as mx, numpy as np
        from octomil import blas, gemv_route
        a, b = mx.random.normal((1, 32)), mx.random.normal((32, 48))
        err = float(np.abs(np.array(a @ b) - np.array(a) @ np.array(b)).max())
        print(gemv_route.active(), gemv_route.routed_calls(), err < 1e-4)
        print(blas.describe())
        """
    )
    return run_python(code, env)


def test_disabled_route_leaves_sgemm_in_charge():
    status, line = _probe({gemv_route.DISABLE_ENV: "1"})
    assert status == "False 0 True"
    assert gemv_route.DISABLE_ENV in line


def test_missing_compiler_falls_back_with_a_reason(tmp_path):
    env = {
        "OCTOMIL_CACHE": str(tmp_path),
        "CC": str(tmp_path / "no-such-cc"),
        "TMPDIR": str(tmp_path),
    }
    status, line = _probe(env)
    assert status == "False 0 True"
    assert "failed" in line or "could not build" in line, line


def test_unwritable_cache_falls_back_to_a_private_temp_dir(tmp_path):
    # /proc refuses new directories even to root, where a read-only mode would not.
    status, _ = _probe({"OCTOMIL_CACHE": "/proc/octomil-cache", "TMPDIR": str(tmp_path)})
    assert status.startswith("True ")
    private = tmp_path / f"octomil-{os.getuid()}"
    assert oct(private.stat().st_mode & 0o777) == "0o700"
    assert [p.name.startswith("gemv_route-") for p in (private / "native").iterdir()] == [True]


def test_a_temp_dir_others_can_write_is_not_used(tmp_path):
    shared = tmp_path / f"octomil-{os.getuid()}"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    status, line = _probe({"OCTOMIL_CACHE": "/proc/octomil-cache", "TMPDIR": str(tmp_path)})
    assert status == "False 0 True"
    assert "could not build" in line
    assert not (shared / "native").exists()


def test_first_use_builds_into_the_user_cache(tmp_path):
    status, _ = _probe({"OCTOMIL_CACHE": str(tmp_path), "TMPDIR": str(tmp_path)})
    assert status.startswith("True ")
    assert [p.name.startswith("gemv_route-") for p in (tmp_path / "native").iterdir()] == [True]
