"""Presets and threshold validation (``octomil.config``)."""

import pytest

from octomil.config import ConfigError, SpeedQuality, resolve_early_exit


@pytest.mark.parametrize(
    ("preset", "threshold", "fraction"),
    [("quality", 0.1, 0.75), ("balanced", 0.3, 0.5), ("fast", 0.5, 0.25)],
)
def test_presets(preset, threshold, fraction):
    s = resolve_early_exit(preset)
    assert (s.threshold, s.min_layers_fraction, s.preset) == (
        threshold,
        fraction,
        SpeedQuality(preset),
    )


def test_preset_overrides_explicit_threshold():
    assert resolve_early_exit("fast", threshold=0.05).threshold == 0.5


def test_no_threshold_no_preset_is_full_depth():
    s = resolve_early_exit()
    assert not s.enabled and s.describe() == "Disabled"


def test_describe_matches_startup_line():
    assert resolve_early_exit("balanced").describe() == "Enabled: threshold=0.3, min_layers=50%"


@pytest.mark.parametrize("bad", [-0.01, 1.01, float("nan"), 7])
def test_threshold_outside_unit_interval_is_an_error(bad):
    with pytest.raises(ConfigError) as exc:
        resolve_early_exit(threshold=bad)
    assert exc.value.param == "threshold"


def test_unknown_preset_is_an_error():
    with pytest.raises(ConfigError, match="unknown speed-quality preset"):
        resolve_early_exit("turbo")


def test_min_layers_rounds_up():
    assert resolve_early_exit("balanced").min_layers(30) == 15
    assert resolve_early_exit("quality").min_layers(30) == 23
