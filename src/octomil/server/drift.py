"""Shadow-check counters and the drift alarm: live counterfactual error rate vs the budget.

Each shadow result (``engine.shadow``) says whether an early-exited token equals the token full
depth would have produced. They are counted by exit layer and preset
(``octomil_shadow_checked_tokens_total``, ``octomil_shadow_disagreements_total``) and fed to a
rolling window per preset. When a full window disagrees more often than the preset's budget
(the exit policy's calibrated budget, else calibration's default for the nearest preset, or
``--drift-budget``) plus ``--drift-margin``, a warning is logged; with ``--auto-fallback`` early
exit is switched off (the control's ``drift_fallback``). While it is off, requests decode at
full depth in *observe* mode: exits are decided but not taken and still shadow-checked, so the
window keeps measuring what the policy would do. The fallback ends when a fresh full window is
back within the budget itself (no margin: hysteresis, so the state does not flap).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge

from octomil.config import PRESETS, EarlyExitSettings, SpeedQuality
from octomil.server.exit_control import ExitControl

logger = logging.getLogger("octomil.server.drift")

# octomil calibrate's disagreement budgets per preset (calibrate/pipeline.py BUDGETS).
DEFAULT_BUDGETS = {SpeedQuality.quality: 0.01, SpeedQuality.balanced: 0.03, SpeedQuality.fast: 0.08}
DEFAULT_WINDOW = 200
DEFAULT_MARGIN = 0.05


def preset_label(settings: EarlyExitSettings) -> str:
    return settings.preset.value if settings.preset is not None else "custom"


def default_budget(settings: EarlyExitSettings) -> float:
    """Calibration's budget for ``settings``' preset, or for the preset nearest its threshold."""
    preset = settings.preset
    if preset is None:
        threshold = settings.threshold or 0.0
        preset = min(PRESETS, key=lambda p: abs(PRESETS[p].threshold - threshold))
    return DEFAULT_BUDGETS[preset]


class ShadowMetrics:
    def __init__(self, registry: CollectorRegistry, model: str) -> None:
        self.model = model
        labels = ["model", "exit_layer", "preset"]
        self.checked = Counter(
            "octomil_shadow_checked_tokens",
            "Early-exited tokens compared with the full-depth token (--shadow-rate).",
            labels,
            registry=registry,
        )
        self.disagreements = Counter(
            "octomil_shadow_disagreements",
            "Shadow-checked tokens whose full-depth token differs from the exited one.",
            labels,
            registry=registry,
        )
        self.rate = Gauge(
            "octomil_shadow_disagreement_rate",
            "Disagreement over the drift alarm's rolling window, by preset.",
            ["model", "preset"],
            registry=registry,
        )
        self.budget = Gauge(
            "octomil_shadow_disagreement_budget",
            "The drift alarm's budget (the exit policy's calibrated budget), by preset.",
            ["model", "preset"],
            registry=registry,
        )

    def record(self, exit_layer: int, preset: str, agreed: bool) -> None:
        self.checked.labels(self.model, str(exit_layer), preset).inc()
        if not agreed:
            self.disagreements.labels(self.model, str(exit_layer), preset).inc()


@dataclass
class _Window:
    budget: float
    results: deque[bool]

    @property
    def full(self) -> bool:
        return len(self.results) == self.results.maxlen

    @property
    def rate(self) -> float:
        return sum(not r for r in self.results) / len(self.results) if self.results else 0.0


@dataclass
class DriftAlarm:
    control: ExitControl
    metrics: ShadowMetrics
    budget_of: Callable[[EarlyExitSettings], float]
    window: int = DEFAULT_WINDOW
    margin: float = DEFAULT_MARGIN
    auto_fallback: bool = False
    windows: dict[str, _Window] = field(default_factory=dict)
    tripped: set[str] = field(default_factory=set)

    def record(self, settings: EarlyExitSettings, results: tuple[tuple[int, bool], ...]) -> None:
        label = preset_label(settings)
        w = self.windows.get(label)
        if w is None:
            w = self.windows[label] = _Window(self.budget_of(settings), deque(maxlen=self.window))
            self.metrics.budget.labels(self.metrics.model, label).set(w.budget)
        for exit_layer, agreed in results:
            self.metrics.record(exit_layer, label, agreed)
            w.results.append(agreed)
            if w.full:
                self._judge(label, w)
        self.metrics.rate.labels(self.metrics.model, label).set(w.rate)

    def _judge(self, label: str, w: _Window) -> None:
        rate = w.rate
        if label not in self.tripped and rate > w.budget + self.margin:
            self.tripped.add(label)
            action = "serving full depth (--auto-fallback)" if self.auto_fallback else "no action"
            logger.warning(
                "drift alarm: preset %s disagrees with full depth on %.1f%% of the last %d "
                "shadow-checked tokens (budget %.1f%% + margin %.1f%%): %s",
                label,
                100 * rate,
                len(w.results),
                100 * w.budget,
                100 * self.margin,
                action,
                extra={"preset": label, "disagreement": rate, "budget": w.budget},
            )
            w.results.clear()  # recovery is judged on a fresh window
            if self.auto_fallback:
                self.control.set_fallback(True, f"preset {label}: disagreement {rate:.3f}")
        elif label in self.tripped and rate <= w.budget:
            self.tripped.discard(label)
            logger.warning(
                "drift alarm cleared: preset %s disagrees on %.1f%% (budget %.1f%%)",
                label,
                100 * rate,
                100 * w.budget,
                extra={"preset": label, "disagreement": rate, "budget": w.budget},
            )
            if not self.tripped:
                self.control.set_fallback(False, f"preset {label}: disagreement {rate:.3f}")
