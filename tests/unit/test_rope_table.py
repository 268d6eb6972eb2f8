"""Table RoPE equals mx.fast.rope (fp32 rounding) and is installed where the stock one was."""

import octomil  # noqa: F401, I001  (loads OpenBLAS; must precede every mlx import)

import mlx.core as mx
import mlx.nn as nn
import pytest
from tiny_models import SUPPORTED, make_tiny_model

from octomil.models.rope_table import RopeTables, TableRoPE, install_table_rope


@pytest.mark.parametrize("traditional", [True, False])
@pytest.mark.parametrize(("dims", "head_dim"), [(64, 64), (32, 64)])
@pytest.mark.parametrize(("offset", "length"), [(0, 1), (0, 9), (137, 1), (4000, 3)])
def test_matches_fast_rope(traditional, dims, head_dim, offset, length):
    stock = nn.RoPE(dims, traditional=traditional, base=100000.0, scale=0.5)
    holder = nn.Module()
    holder.rope = nn.RoPE(dims, traditional=traditional, base=100000.0, scale=0.5)
    assert install_table_rope(holder) == 1 and isinstance(holder.rope, TableRoPE)
    x = mx.random.normal((1, 3, length, head_dim), key=mx.random.key(offset + length))
    for _ in range(2):  # the second call reads the cached table
        got = holder.rope(x, offset=offset)
        # The same angles as MLX computes them; only x*cos + x'*sin's rounding may differ.
        assert mx.allclose(got, stock(x, offset=offset), rtol=1e-5, atol=1e-5)
    if dims < head_dim:
        assert mx.array_equal(got[..., dims:], x[..., dims:])


def test_array_offsets_take_the_stock_path():
    holder = nn.Module()
    holder.rope = nn.RoPE(16, traditional=False, base=10000.0)
    install_table_rope(holder)
    x = mx.random.normal((2, 1, 1, 16))
    offsets = mx.array([3, 5])
    assert mx.array_equal(holder.rope(x, offset=offsets), holder.rope.original(x, offset=offsets))


@pytest.mark.parametrize("family", SUPPORTED)
def test_installed_in_every_layer_with_one_shared_table(family):
    model = make_tiny_model(family)
    plain = [m for _, m in model.named_modules() if type(getattr(m, "rope", None)) is nn.RoPE]
    replaced = install_table_rope(model)
    assert replaced == len(plain)
    tables = {
        id(m.rope._tables)
        for _, m in model.named_modules()
        if isinstance(getattr(m, "rope", None), TableRoPE)
    }
    assert len(tables) <= 1
    logits = model(mx.array([[1, 2, 3, 4]]))
    assert mx.all(mx.isfinite(logits)).item()


def test_a_steps_row_tables_survive_a_neighbours_rows():
    """Two segments' rows of one step (16 decode rows, a 32-row verification or chunk) looked up
    in turn every layer stay cached: their single-position tables do not evict each other."""
    tables = RopeTables(64, False, 10000.0, 1.0)
    decode, other = tuple(range(100, 1700, 100)), tuple(range(40, 72))
    first = tables.rows(decode, 64)
    tables.rows(other, 64)
    assert tables.rows(decode, 64) is first
    assert mx.array_equal(first[0][3], tables.get(400, 1, 64)[0][0])
