"""The run-time early-exit control: ceiling, kill switch, fallback, task presets (no server)."""

from __future__ import annotations

from octomil.config import EarlyExitSettings, resolve_early_exit
from octomil.server.exit_control import FULL_DEPTH, ExitControl, cap

FAST = resolve_early_exit(preset="fast")
BALANCED = resolve_early_exit(preset="balanced")
QUALITY = resolve_early_exit(preset="quality")


def test_cap_keeps_conservative_requests_and_caps_aggressive_ones() -> None:
    assert cap(QUALITY, BALANCED) is QUALITY
    assert cap(FAST, BALANCED) == BALANCED
    assert cap(FULL_DEPTH, BALANCED) == FULL_DEPTH
    # Mixed: a lower threshold but fewer layers keeps the threshold, takes the ceiling's depth.
    mixed = cap(EarlyExitSettings(0.1, 0.2), BALANCED)
    assert (mixed.threshold, mixed.min_layers_fraction, mixed.preset) == (0.1, 0.5, None)
    assert cap(FAST, FULL_DEPTH) == FULL_DEPTH  # nothing may exit when the server does not


def test_resolve_applies_ceiling_kill_switch_and_fallback_in_order() -> None:
    control = ExitControl(BALANCED, task_presets={"code": QUALITY})
    assert control.resolve(None).settings == BALANCED
    assert control.resolve(None, "code").settings == QUALITY
    assert control.resolve(FAST).capped and control.resolve(FAST).settings == BALANCED
    seen: list[str] = []
    control.listeners.append(lambda c: seen.append(c.reason))
    control.change("admin", enabled=False)
    assert control.resolve(QUALITY).settings == FULL_DEPTH
    control.change("admin", enabled=True)
    control.set_fallback(True, "drift")
    # The fallback serves full depth in observe mode: exits decided, not taken, still checked.
    observed = control.resolve(None, "code").settings
    assert observed.observe and (observed.threshold, observed.preset) == (0.1, QUALITY.preset)
    control.set_fallback(False, "recovered")
    assert seen == ["admin_off", "configured", "drift_fallback", "configured"]
    assert [c.by for c in control.history] == ["admin", "admin", "drift-alarm", "drift-alarm"]


def test_allow_aggressive_overrides_passes_requests_through() -> None:
    control = ExitControl(BALANCED, allow_aggressive=True)
    resolved = control.resolve(FAST)
    assert resolved.settings == FAST and not resolved.capped
