"""Octomil's quantized products (``octomil.quant.kernel``) against a float64 reference computed from
MLX's own ``mx.dequantize``: 4 and 8 bits, group sizes 32/64/128, the embedded model's projection
shapes and ragged ones, 1-9, 15-17, max_rows() and max_rows() + 1 rows and a prefill-sized
product, with every instruction set this CPU has.

Tolerance: |ours - reference| <= 1e-5 * (|x| @ |W|.T) + 1e-30 per element, a bound on fp32 rounding
of a k <= 1536 term sum relative to the sum of the terms' magnitudes (fp32 epsilon 6e-8 times
sqrt(k) ~ 40 gives 2.4e-6; the few-row kernel and sgemm both stay below it). The int8 kernels
(``*-int8``) round each block of 32 inputs of a row to steps dx = max|x| / 127, each input by at
most dx / 2, and that error meets the centred codes: their few-row products get, on top, the
bound sum over blocks of |s| * dx / 2 * sum |q - z| (z = 8 for 4 bits, 128 for 8; times 1.0001
for the rounding of dx itself). Prefill-sized products keep fp32 activations and the first bound."""

import platform
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from fresh_python import run_python

from octomil.quant import kernel

pytestmark = pytest.mark.skipif(not kernel.available(), reason=kernel.reason())

# (n, k): q/o and gate/up/down of the embedded model, and ragged outputs (a partial chunk).
SHAPES = ((576, 576), (1536, 576), (576, 1536), (200, 128))


@pytest.fixture(
    params=["avx512vnni-int8", "avxvnni-int8", "avx2-int8", "avx512", "avx2", "generic"]
)
def isa(request):
    best = kernel.isa()
    if not kernel.select_isa(request.param):
        pytest.skip(f"this CPU lacks {request.param}")
    yield request.param
    assert kernel.select_isa(best)


def _quantized(n: int, k: int, bits: int, group_size: int, seed: int, dtype=mx.float32):
    """Codes, scales and biases (``dtype``: fp32, or fp16 as a GGUF's Q4_1/Q8_0 stores them) and
    the float64 dequantized weights they stand for."""
    w = mx.random.normal((n, k), key=mx.random.key(seed)) * 0.05
    wq, scales, biases = mx.quantize(w, group_size=group_size, bits=bits)
    scales, biases = scales.astype(dtype), biases.astype(dtype)
    dense = mx.dequantize(
        wq, scales.astype(mx.float32), biases.astype(mx.float32), group_size=group_size, bits=bits
    )
    return wq, scales, biases, np.array(dense, dtype=np.float64)


def _codes(wq, bits: int) -> np.ndarray:
    """The (n, k) integer codes of MLX's packing (little-endian words; 4 bits: low nibble first)."""
    raw = np.array(wq).view(np.uint8).reshape(wq.shape[0], -1).astype(np.int64)
    if bits == 8:
        return raw
    codes = np.empty((raw.shape[0], raw.shape[1] * 2), np.int64)
    codes[:, 0::2], codes[:, 1::2] = raw & 15, raw >> 4
    return codes


def _bound(xd, wq, scales, dense, bits: int, group_size: int) -> np.ndarray:
    """The module docstring's tolerance for ``xd`` (rows, k) against the current kernel."""
    bound = 1e-5 * (np.abs(xd) @ np.abs(dense).T) + 1e-30
    if kernel.activations() == "int8" and xd.shape[0] <= kernel.max_rows():
        n, k = dense.shape
        centred = np.abs(_codes(wq, bits) - (8 if bits == 4 else 128)).astype(np.float64)
        per_block = centred.reshape(n, k // 32, 32).sum(-1)  # (n, blocks)
        s = np.abs(np.array(scales.astype(mx.float32), np.float64)).repeat(group_size // 32, 1)
        step = np.abs(xd).reshape(xd.shape[0], k // 32, 32).max(-1) / 127  # (rows, blocks)
        bound += (step / 2 * 1.0001) @ (s * per_block).T
    return bound


def _check(rows: int, wq, scales, biases, dense, bits: int, group_size: int, seed: int) -> None:
    x = mx.random.normal((rows, dense.shape[1]), key=mx.random.key(seed + 1))
    got = np.array(kernel.quantized_matmul(x, wq, scales, biases, group_size, bits))
    xd = np.array(x, dtype=np.float64)
    want = xd @ dense.T
    bound = _bound(xd, wq, scales, dense, bits, group_size)
    assert got.shape == want.shape
    assert np.all(np.abs(got - want) <= bound), np.max(np.abs(got - want) / bound)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("n,k", SHAPES)
def test_every_row_count_matches_the_dequantized_product(isa, bits, n, k):
    wq, scales, biases, dense = _quantized(n, k, bits, 32, seed=n + k + bits)
    for rows in (*range(1, 10), 15, 16, 17, kernel.max_rows(), kernel.max_rows() + 1, 40):
        _check(rows, wq, scales, biases, dense, bits, 32, seed=rows)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("n,k", SHAPES)
def test_fp16_scales_and_biases(isa, bits, n, k):
    """Scales and biases kept in fp16 (the GGUF's Q4_1 bytes) are read as the same numbers."""
    wq, scales, biases, dense = _quantized(n, k, bits, 32, seed=n + k, dtype=mx.float16)
    for rows in (1, 2, 3, 4, 5, 8, 9, 16, kernel.max_rows() + 1):
        _check(rows, wq, scales, biases, dense, bits, 32, seed=rows)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("group_size", [64, 128])
def test_larger_groups(isa, bits, group_size):
    wq, scales, biases, dense = _quantized(300, 1536, bits, group_size, seed=group_size)
    for rows in (1, 3, 16, 33):
        _check(rows, wq, scales, biases, dense, bits, group_size, seed=rows)


@pytest.mark.parametrize("bits", [8, 4])
def test_head_shape(bits):
    """The tied LM head (49152 x 576): the product decode runs once per token."""
    wq, scales, biases, dense = _quantized(49152, 576, bits, 32, seed=7)
    for rows in (1, 5, 33):
        _check(rows, wq, scales, biases, dense, bits, 32, seed=rows)


@pytest.mark.parametrize("bits", [8, 4])
def test_a_row_is_bitwise_the_same_alone_or_in_a_batch(isa, bits):
    """Pins the few-row kernel's fixed summation order: batching (any tile of rows and outputs)
    must not change a row's bits."""
    wq, scales, biases, _ = _quantized(1538, 576, bits, 32, seed=3, dtype=mx.float16)
    x = mx.random.normal((kernel.max_rows(), 576), key=mx.random.key(4))
    batch = kernel.quantized_matmul(x, wq, scales, biases, 32, bits)
    for rows in (1, 2, 3, 5, 9):
        part = kernel.quantized_matmul(x[:rows], wq, scales, biases, 32, bits)
        assert mx.array_equal(part, batch[:rows])
    for r in (0, 1, 5, kernel.max_rows() - 1):
        alone = kernel.quantized_matmul(x[r : r + 1], wq, scales, biases, 32, bits)
        assert mx.array_equal(alone[0], batch[r])


def test_leading_dimensions_and_graph_laziness():
    """(batch, tokens, k) inputs keep their leading shape, and the op composes inside a graph."""
    wq, scales, biases, dense = _quantized(576, 576, 8, 32, seed=5)
    x = mx.random.normal((2, 3, 576), key=mx.random.key(6))
    y = kernel.quantized_matmul(x, wq, scales, biases, 32, 8) * 2.0 + 1.0
    xd = np.array(x, dtype=np.float64).reshape(6, 576)
    want = (xd @ dense.T) * 2.0 + 1.0
    assert y.shape == (2, 3, 576)
    bound = 2.0 * _bound(xd, wq, scales, dense, 8, 32) + 1e-6
    assert np.all(np.abs(np.array(y).reshape(6, 576) - want) <= bound)


@pytest.mark.parametrize("bits", [8, 4])
def test_strided_inputs_are_read_as_their_elements(isa, bits):
    """A transposed or sliced x (no Contiguous node in the graph: the primitive gathers it) gives
    the bits its contiguous copy gives."""
    wq, scales, biases, _ = _quantized(200, 128, bits, 32, seed=12, dtype=mx.float16)
    base = mx.random.normal((128, 6), key=mx.random.key(13))
    for x in (base.T, mx.random.normal((6, 256), key=mx.random.key(14))[:, ::2]):
        strided = kernel.quantized_matmul(x, wq, scales, biases, 32, bits)
        copied = kernel.quantized_matmul(mx.array(np.array(x)), wq, scales, biases, 32, bits)
        assert mx.array_equal(strided, copied)


@pytest.mark.parametrize("bits", [4, 8])
def test_gradient_with_respect_to_x_is_the_dequantized_product(bits):
    """Calibration trains exit adapters through a compact head: d/dx sum(g * (x W^T)) = g W.
    Regression: ``octomil calibrate --dtype q4`` stopped with "vjp not implemented"."""
    wq, scales, biases, dense = _quantized(200, 128, bits, 32, seed=9, dtype=mx.float16)
    x = mx.random.normal((3, 5, 128), key=mx.random.key(10))
    g = mx.random.normal((3, 5, 200), key=mx.random.key(11))

    def loss(x):
        return (kernel.quantized_matmul(x, wq, scales, biases, 32, bits) * g).sum()

    grad = mx.grad(loss)(x)
    want = np.array(g, dtype=np.float64) @ dense
    assert grad.shape == x.shape
    assert np.allclose(np.array(grad), want, rtol=1e-4, atol=1e-5)

    def by_scales(s):
        return kernel.quantized_matmul(x, wq, s, biases, 32, bits).sum()

    with pytest.raises(ValueError, match="compact weights are frozen"):
        mx.eval(mx.grad(by_scales)(scales))


def test_bad_arguments_raise_value_errors():
    wq, scales, biases, _ = _quantized(64, 64, 8, 32, seed=8)
    with pytest.raises(ValueError, match="last dimension must be 64"):
        kernel.quantized_matmul(mx.zeros((1, 32)), wq, scales, biases, 32, 8)
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        kernel.quantized_matmul(mx.zeros((1, 64)), wq, scales, biases, 32, 3)
    with pytest.raises(ValueError, match="both float32 or float16"):
        kernel.quantized_matmul(mx.zeros((1, 64)), wq, scales.astype(mx.float16), biases, 32, 8)
    with pytest.raises(ValueError, match="both float32 or float16"):
        kernel.quantized_matmul(
            mx.zeros((1, 64)), wq, scales.astype(mx.bfloat16), biases.astype(mx.bfloat16), 32, 8
        )


def test_a_fresh_process_takes_the_fast_paths():
    """In a fresh interpreter (OpenBLAS and the route loaded by ``import octomil``), a one-row
    product runs the few-row kernel and a 40-row one dequantizes for sgemm: the counters move.
    On a CPU with AVX2 (and FMA, F16C) the few-row kernel is an int8 one."""
    code = (
        "import octomil, mlx.core as mx\n"
        "from octomil.quant import kernel\n"
        "wq, s, b = mx.quantize(mx.random.normal((256, 256)), group_size=32, bits=4)\n"
        "mx.eval(kernel.quantized_matmul(mx.ones((1, 256)), wq, s, b, 32, 4))\n"
        "print(kernel.calls(), kernel.calls(prefill=True))\n"
        "mx.eval(kernel.quantized_matmul(mx.ones((40, 256)), wq, s, b, 32, 4))\n"
        "print(kernel.calls(), kernel.calls(prefill=True), kernel.isa() != '')\n"
        "print(kernel.activations())\n"
    )
    flags = set()
    if Path("/proc/cpuinfo").exists():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    int8 = platform.machine() in ("x86_64", "AMD64") and {"avx2", "fma", "f16c"} <= flags
    assert run_python(code) == ["1 0", "1 1 True", "int8" if int8 else "float32"]


def test_the_few_row_kernel_serves_every_product_a_batched_step_makes():
    """A batched decode step caps its products at the route's row limit (``layer_loop``); with
    compact weights each of those products must still take this kernel's row-invariant path,
    or a sequence's tokens would depend on its neighbours. Raising one limit needs the other."""
    from octomil.blas import route

    if not route.active():
        pytest.skip("the few-row route is off here")
    assert kernel.max_rows() >= route.max_rows()
