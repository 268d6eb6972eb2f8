"""What the server reports about early exit follows the kill switch: stats endpoint and gauges.

``GET /v1/early-exit/stats`` and the gauges ``octomil_early_exit_{enabled,threshold,min_layers,
effective,checks_placed}`` describe the settings a request without its own ``early_exit`` field
decodes with *now*: the admin's preset or threshold after ``POST /admin/early-exit``, full depth
while early exit is switched off or the drift alarm's fallback holds. (They once kept the startup
settings, so an operator who switched early exit off still read ``enabled: true`` there.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from octomil.config import EarlyExitSettings
from octomil.engine.types import EffectiveEarlyExit
from octomil.server.exit_control import FULL_DEPTH, ExitControl
from octomil.server.metrics import ServerMetrics
from octomil.server.telemetry import EarlyExitTotals


class _Placing(Protocol):
    def effective(self, settings: EarlyExitSettings) -> EffectiveEarlyExit: ...


def live_settings(control: ExitControl) -> EarlyExitSettings:
    """The settings of a request that brings none: full depth when off or falling back."""
    return control.default if control.enabled else FULL_DEPTH


def reporter(
    engine: object, metrics: ServerMetrics, totals: EarlyExitTotals
) -> Callable[[ExitControl], None]:
    """A listener for :class:`ExitControl` that keeps ``metrics`` and ``totals`` current."""
    placing: _Placing | None = engine if hasattr(engine, "effective") else None  # type: ignore[assignment]
    total_layers: int = engine.total_layers  # type: ignore[attr-defined]

    def report(control: ExitControl) -> None:
        live = live_settings(control)
        checks = (
            tuple(placing.effective(live).exit_layers)
            if placing is not None and live.enabled
            else ()
        )
        totals.settings, totals.checks_placed, totals.reason = live, checks, control.reason
        metrics.set_settings(live, total_layers, checks, reason=control.reason)

    return report
