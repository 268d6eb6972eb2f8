"""Few-row fp32 products go through the route (rows kernel, one-column sgemv), MLX's products give
the same numbers, the mode switch works, and the route degrades cleanly (no compiler, disabled,
unwritable cache)."""

import os
import sys
import textwrap

import numpy as np
import pytest
from fresh_python import run_python

from octomil import blas
from octomil.blas import build, route

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the route exists on Linux only")

import mlx.core as mx  # noqa: E402  (after octomil: the route must be loaded before mlx)


def test_route_is_active_and_counts_routed_products():
    assert route.active(), route.reason()
    assert f"1-{route.max_rows()} rows via octomil rows kernel ({route.isa()})" in blas.describe()
    assert route.max_rows() >= 16
    b = mx.random.normal((64, 96))
    rows = mx.random.normal((route.max_rows() + 1, 64))
    mx.eval(b, rows)
    before = route.routed_calls()
    mx.eval(rows[:1] @ b)  # a decode step
    assert route.routed_calls() == before + 1
    mx.eval(rows[:3] @ b)  # a few rows: one read of the weights for all
    mx.eval(rows[: route.max_rows()] @ b)
    assert route.routed_calls() == before + 3
    mx.eval(rows @ b)  # one row more: OpenBLAS's sgemm, not the route
    assert route.routed_calls() == before + 3
    mx.eval(b.T @ rows[:1].T)  # one column of 96 rows: OpenBLAS's sgemv
    assert route.routed_calls() == before + 4


def test_modes_send_products_to_sgemm_or_sgemv_per_row():
    a, b = mx.random.normal((1, 64)), mx.random.normal((64, 96))
    five = mx.random.normal((5, 64))
    mx.eval(a, b, five)
    before = route.routed_calls()
    with route.disabled():
        off = a @ b
        mx.eval(off)
    assert route.routed_calls() == before
    with route.using("sgemv"):  # the previous route: up to 4 rows, one sgemv per row
        per_row = a @ b
        mx.eval(per_row, five @ b)
    assert route.routed_calls() == before + 1
    on = a @ b
    mx.eval(on)
    assert route.routed_calls() == before + 2
    assert mx.allclose(on, off, rtol=1e-5, atol=1e-5)
    assert mx.allclose(on, per_row, rtol=1e-5, atol=1e-5)


def _close(got: mx.array, want: np.ndarray) -> None:
    np.testing.assert_allclose(np.array(got), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rows", [1, 3, 16, 17])
@pytest.mark.parametrize("transpose_a", [False, True])
@pytest.mark.parametrize("transpose_b", [False, True])
def test_mlx_products_match_numpy(rows, transpose_a, transpose_b):
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
        from octomil import blas
        from octomil.blas import route
        a, b = mx.random.normal((1, 32)), mx.random.normal((32, 48))
        err = float(np.abs(np.array(a @ b) - np.array(a) @ np.array(b)).max())
        print(route.active(), route.routed_calls(), err < 1e-4)
        print(blas.describe())
        """
    )
    return run_python(code, env)


@pytest.mark.parametrize("variable", [route.DISABLE_ENV, "OCTOMIL_NO_GEMV_ROUTE"])
def test_disabled_route_leaves_sgemm_in_charge(variable):
    status, line = _probe({variable: "1"})
    assert status == "False 0 True"
    assert f"few-row products via sgemm: route disabled by {variable}" in line


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
    assert [p.name.startswith(build.PREFIX) for p in (private / "native").iterdir()] == [True]


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
    assert [p.name.startswith(build.PREFIX) for p in (tmp_path / "native").iterdir()] == [True]
