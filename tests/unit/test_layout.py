"""``--dtype auto``: only exact layouts, decided once per machine: load cannot change answers.

Timings are faked (``_time_interleaved``): what is pinned is the choice, not the clock.
"""

import octomil  # noqa: F401, I001  (loads OpenBLAS; must precede every mlx import)

import mlx.core as mx
import mlx.nn as nn
import pytest
from tiny_models import make_tiny_model

from octomil.models import layout
from octomil.models.layout import apply_layout, choose_layout
from octomil.models.transposed import TransposedLinear
from octomil.quant import kernel


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("OCTOMIL_CACHE", str(tmp_path))


def fake_timings(monkeypatch, ms: dict[str, float]) -> list[set[str]]:
    """Every timed candidate takes ``ms[name]`` (rounding layouts 100x faster than any other);
    returns the sets of names that were timed."""
    timed: list[set[str]] = []

    def fake(fns, rounds=7, repeats=10):
        timed.append(set(fns))
        return {
            name: ms.get(name, 0.01 if name in ("bfloat16", "float16") else 1.0) for name in fns
        }

    monkeypatch.setattr(layout, "_time_interleaved", fake)
    return timed


def quantized_model() -> nn.Module:
    model = make_tiny_model("llama")
    nn.quantize(model, group_size=32, bits=4)
    return model


@pytest.mark.parametrize("make", [quantized_model, lambda: make_tiny_model("llama")])
def test_auto_never_picks_a_rounding_layout(monkeypatch, make) -> None:
    """Regression: under CPU load auto picked bfloat16 (timed faster), and greedy answers
    changed (17 * 23 = 381 instead of 371)."""
    timed = fake_timings(monkeypatch, {})
    choice = choose_layout(make())
    assert choice.layout in ("native", "float32", "q4")
    assert not any({"bfloat16", "float16"} & names for names in timed)


def test_bfloat16_only_when_asked() -> None:
    assert choose_layout(make_tiny_model("llama"), "bfloat16").layout == "bfloat16"


def test_quantized_native_vs_float32_is_decided_once(monkeypatch) -> None:
    """A 4-bit checkpoint's own precision runs on Octomil's kernel (q4) where it is available."""
    own = "q4" if kernel.available() else "native"
    slow = {own: 2.0, "float32": 1.0, f"{own} x8": 4.0, "float32 x8": 3.0}
    fake_timings(monkeypatch, slow)
    first = choose_layout(quantized_model())
    assert (first.layout, first.cached) == ("float32", False)
    assert first.timings_ms == {k: v for k, v in slow.items() if own == "q4" or " x" not in k}
    fake_timings(monkeypatch, {own: 1.0, "float32": 2.0})  # the machine got busy
    again = choose_layout(quantized_model())
    assert (again.layout, again.cached) == ("float32", True)
    assert "decided earlier on this machine" in again.describe("4-bit quantized")


@pytest.mark.skipif(not kernel.available(), reason="octomil's quantized kernel is not built")
@pytest.mark.parametrize(("batch_ms", "expected"), [(2.5, "q4"), (3.5, "float32")])
def test_compact_must_also_win_on_a_batch(monkeypatch, tmp_path, batch_ms, expected) -> None:
    """Regression: auto picked q4 for its one-row speed although 8-row products (batched
    serving) ran 1.3x slower than fp32 on AVX2."""
    monkeypatch.setenv("OCTOMIL_CACHE", str(tmp_path / expected))
    fake_timings(monkeypatch, {"q4": 1.0, "float32": 2.0, "q4 x8": batch_ms, "float32 x8": 3.0})
    assert choose_layout(quantized_model()).layout == expected


@pytest.mark.skipif(not kernel.available(), reason="octomil's quantized kernel is not built")
def test_compact_only_where_the_caller_calibrated_that_format(monkeypatch) -> None:
    """Regression: with the tiled kernel auto picked q4 on a fresh machine, although the exit
    policy (and its measured quality) was made at fp32: exits and answers changed."""
    timed = fake_timings(
        monkeypatch, {"q4": 1.0, "float32": 2.0, "native": 3.0, "q4 x8": 1.0, "float32 x8": 3.0}
    )
    asked: list[str] = []

    def never(fmt: str) -> bool:
        asked.append(fmt)
        return False

    assert choose_layout(quantized_model(), "auto", never).layout == "float32"
    assert asked == ["q4"] and not any("q4" in name for names in timed for name in names)
    assert choose_layout(quantized_model(), "auto", lambda fmt: fmt == "q4").layout == "q4"


def test_storage_is_decided_once(monkeypatch) -> None:
    """(out, in) and (in, out) storage round differently in decode steps: the first timing on
    this machine decides for every later load."""
    fake_timings(monkeypatch, {"out_in": 2.0, "in_out": 1.0})
    model = make_tiny_model("llama")
    first = apply_layout(model, choose_layout(model, "float32"))
    assert first.transposed and first.storage_ms == (2.0, 1.0)
    fake_timings(monkeypatch, {"out_in": 1.0, "in_out": 2.0})
    model = make_tiny_model("llama")
    again = apply_layout(model, choose_layout(model, "float32"))
    assert again.transposed and again.cached
    assert any(isinstance(m, TransposedLinear) for _, m in model.named_modules())


def test_decisions_differ_by_weights_format(monkeypatch) -> None:
    fake_timings(monkeypatch, {"native": 2.0, "q4": 2.0, "float32": 1.0})
    assert choose_layout(quantized_model()).layout == "float32"
    bf16 = make_tiny_model("llama")
    bf16.set_dtype(mx.bfloat16)
    fake_timings(monkeypatch, {"native": 1.0, "float32": 2.0})
    choice = choose_layout(bf16)  # a new key (bfloat16 weights): measured, not the 4-bit answer
    assert (choice.layout, choice.cached) == ("native", False)
