"""The drift alarm: trips over budget + margin, falls back, recovers within the budget."""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry

from octomil.config import resolve_early_exit
from octomil.server.drift import DriftAlarm, ShadowMetrics, default_budget
from octomil.server.exit_control import ExitControl

FAST = resolve_early_exit(preset="fast")


def _alarm(auto: bool) -> tuple[DriftAlarm, ExitControl, CollectorRegistry]:
    control = ExitControl(FAST)
    registry = CollectorRegistry()
    alarm = DriftAlarm(
        control,
        ShadowMetrics(registry, "m"),
        default_budget,
        window=10,
        margin=0.1,
        auto_fallback=auto,
    )
    return alarm, control, registry


def _feed(alarm: DriftAlarm, disagreements: int, total: int) -> None:
    results = tuple((8, k >= disagreements) for k in range(total))
    alarm.record(FAST, results)


def test_trips_only_on_a_full_window_over_budget_plus_margin(caplog) -> None:
    alarm, control, registry = _alarm(auto=True)
    _feed(alarm, 9, 9)  # 100% but the window (10) is not full yet
    assert control.enabled
    _feed(alarm, 0, 1)  # 9/10 = 90% > 8% + 10%
    assert (control.enabled, control.reason) == (False, "drift_fallback")
    assert "drift alarm: preset fast disagrees with full depth on 90.0%" in caplog.text
    assert (
        registry.get_sample_value(
            "octomil_shadow_checked_tokens_total",
            {"model": "m", "exit_layer": "8", "preset": "fast"},
        )
        == 10
    )
    assert (
        registry.get_sample_value(
            "octomil_shadow_disagreements_total",
            {"model": "m", "exit_layer": "8", "preset": "fast"},
        )
        == 9
    )
    # Within budget + margin but over the budget: still in fallback (hysteresis).
    _feed(alarm, 1, 10)  # 10%: over 8%
    assert not control.enabled
    _feed(alarm, 0, 10)  # 0%: recovered
    assert (control.enabled, control.reason) == (True, "configured")
    assert "drift alarm cleared" in caplog.text


def test_without_auto_fallback_the_alarm_only_logs(caplog) -> None:
    caplog.set_level(logging.WARNING)
    alarm, control, _ = _alarm(auto=False)
    _feed(alarm, 10, 10)
    assert control.enabled
    assert "drift alarm" in caplog.text and "no action" in caplog.text
