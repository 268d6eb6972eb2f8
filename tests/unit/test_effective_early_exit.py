"""What the startup line, /metrics and the dashboard report: the checks actually placed."""

import pytest
from tiny_models import make_tiny_model, tiny_engine

from octomil.config import resolve_early_exit
from octomil.engine.engine import Engine
from octomil.engine.exit_adapters import ExitPolicyChoice
from octomil.server.metrics import ServerMetrics

FAST = resolve_early_exit(preset="fast")


def test_disabled_is_just_disabled(byte_tokenizer) -> None:
    effective = tiny_engine(make_tiny_model("llama"), byte_tokenizer).effective_early_exit
    assert (effective.active, effective.describe()) == (False, "Disabled")


def test_checks_placed_are_named(byte_tokenizer) -> None:
    engine = tiny_engine(make_tiny_model("llama"), byte_tokenizer, FAST, exit_layers=(2, 3))
    effective = engine.effective_early_exit
    assert effective.exit_layers == (2, 3)
    assert effective.describe() == (
        "Enabled: threshold=0.5, min_layers=25%, checks after layers 2, 3"
    )


@pytest.mark.parametrize(
    ("choice", "why"),
    [
        (
            ExitPolicyChoice(None, False, "none (--exit-policy none): full depth"),
            "--exit-policy none",
        ),
        (
            ExitPolicyChoice(None, False, "no exit policy for tiny-llama: ..."),
            "no calibrated exit policy for this model (`octomil calibrate tiny-llama`)",
        ),
    ],
)
def test_enabled_without_checks_says_full_depth(byte_tokenizer, choice, why) -> None:
    """Regression: "Enabled" alone was printed when the policy placed no check."""
    loaded = tiny_engine(make_tiny_model("llama"), byte_tokenizer).loaded
    effective = Engine(loaded, FAST, None, choice).effective_early_exit
    assert not effective.active
    assert effective.describe() == (
        f"Enabled: threshold=0.5, min_layers=25% — {why}, serving full depth"
    )


def test_metrics_export_the_effective_state() -> None:
    def gauges(checks: tuple[int, ...]) -> dict[str, float]:
        m = ServerMetrics("m", 30, FAST, checks)
        return {
            s.name: s.value
            for f in m.registry.collect()
            for s in f.samples
            if s.name.startswith("octomil_early_exit_")
        }

    assert gauges(()) == {
        "octomil_early_exit_threshold": 0.5,
        "octomil_early_exit_enabled": 1.0,  # {reason="configured"}
        "octomil_early_exit_effective": 0.0,
        "octomil_early_exit_checks_placed": 0.0,
        "octomil_early_exit_min_layers": 8.0,
        "octomil_early_exit_tokens_total": 0.0,
    }
    assert gauges((8, 15, 22))["octomil_early_exit_effective"] == 1.0
    assert gauges((8, 15, 22))["octomil_early_exit_checks_placed"] == 3.0
