"""Run-time control of early exit: the kill switch, the override ceiling, task presets, fallback.

The server decides *which settings* a request decodes with; the engine decides what those
settings mean in layers. Every request's settings go through :meth:`ExitControl.resolve`:

1. the server default is what ``--speed-quality`` / ``--early-exit-threshold`` set, or what an
   admin set later (``POST /admin/early-exit``);
2. a request's ``early_exit`` field, or else its task class (``--policy-file``), picks settings;
   a client's own settings may be more conservative than the default (lower threshold, more
   layers) but never more aggressive: they are capped at the default, the *ceiling*, unless the
   server runs with ``--allow-aggressive-overrides``;
3. when early exit is switched off by an admin, every request decodes at full depth, whatever
   it asked for; during the drift alarm's fallback too, in *observe* mode (exits decided, never
   taken, still shadow-checked: ``octomil.server.drift``).

Every change is kept (who, when, what) and logged; the state is exported as the gauge
``octomil_early_exit_enabled{reason}`` and in ``/health``.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any

from octomil.config import EarlyExitSettings

logger = logging.getLogger("octomil.server.early_exit")

FULL_DEPTH = EarlyExitSettings()
HISTORY = 50  # changes kept for GET /admin/early-exit


def cap(requested: EarlyExitSettings, ceiling: EarlyExitSettings) -> EarlyExitSettings:
    """``requested`` made no more aggressive than ``ceiling``: a threshold no higher, a minimum
    depth no lower. With the ceiling at full depth, nothing may exit."""
    if not requested.enabled:
        return requested
    if not ceiling.enabled:
        return FULL_DEPTH
    assert requested.threshold is not None and ceiling.threshold is not None
    threshold = min(requested.threshold, ceiling.threshold)
    fraction = max(requested.min_layers_fraction, ceiling.min_layers_fraction)
    if (threshold, fraction) == (requested.threshold, requested.min_layers_fraction):
        return requested
    if (threshold, fraction) == (ceiling.threshold, ceiling.min_layers_fraction):
        return ceiling
    return EarlyExitSettings(threshold, fraction, None)


@dataclass(frozen=True)
class Change:
    at: float  # unix time
    by: str
    what: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.at))
        return {"at": stamp, "by": self.by, **self.what}


@dataclass
class Resolved:
    settings: EarlyExitSettings
    capped: bool = False  # the client asked for more than the ceiling
    source: str = "default"  # default | request | task:<name> | off


def describe(s: EarlyExitSettings) -> dict[str, Any]:
    return {
        "preset": s.preset.value if s.preset else None,
        "threshold": s.threshold,
        "min_layers": s.min_layers_fraction if s.enabled else None,
    }


@dataclass
class ExitControl:
    """Owned by the serving state; used from the event loop only."""

    configured: EarlyExitSettings
    allow_aggressive: bool = False
    task_presets: dict[str, EarlyExitSettings] = field(default_factory=dict)
    default: EarlyExitSettings = field(init=False)
    admin_off: bool = False
    fallback: bool = False
    history: deque[Change] = field(default_factory=lambda: deque(maxlen=HISTORY))
    listeners: list[Any] = field(default_factory=list)  # called with self after each change

    def __post_init__(self) -> None:
        self.default = self.configured

    # ------------------------------------------------------------------ state

    @property
    def enabled(self) -> bool:
        return self.default.enabled and not self.admin_off and not self.fallback

    @property
    def reason(self) -> str:
        """Why early exit is on or off now (the gauge's label)."""
        if self.admin_off:
            return "admin_off"
        if self.fallback:
            return "drift_fallback"
        if not self.default.enabled:
            return "not_configured" if self.default == self.configured else "admin_off"
        return "configured" if self.default == self.configured else "admin_set"

    def as_dict(self) -> dict[str, Any]:
        last = self.history[-1].as_dict() if self.history else None
        return {
            "enabled": self.enabled,
            "reason": self.reason,
            "default": describe(self.default),
            "configured": describe(self.configured),
            "admin_off": self.admin_off,
            "drift_fallback": self.fallback,
            "allow_aggressive_overrides": self.allow_aggressive,
            "last_change": last,
            "history": [c.as_dict() for c in self.history],
        }

    # ------------------------------------------------------------------ changes

    def change(
        self,
        by: str,
        *,
        enabled: bool | None = None,
        settings: EarlyExitSettings | None = None,
    ) -> None:
        """An admin's change: switch on/off, and/or new default settings."""
        what: dict[str, Any] = {}
        if settings is not None:
            self.default = settings
            what["default"] = describe(settings)
        if enabled is not None:
            self.admin_off = not enabled
            what["enabled"] = enabled
        self._record(by, what)

    def set_fallback(self, active: bool, why: str) -> None:
        if active == self.fallback:
            return
        self.fallback = active
        self._record("drift-alarm", {"drift_fallback": active, "why": why})

    def _record(self, by: str, what: dict[str, Any]) -> None:
        change = Change(time.time(), by, {**what, "now_enabled": self.enabled})
        self.history.append(change)
        logger.warning(
            "early exit changed by %s: %s (now %s, reason %s)",
            by,
            what,
            "on" if self.enabled else "off",
            self.reason,
            extra={"change_by": by, "early_exit_enabled": self.enabled, "reason": self.reason},
        )
        for listener in self.listeners:
            listener(self)

    # ------------------------------------------------------------------ requests

    def resolve(self, requested: EarlyExitSettings | None, task: str | None = None) -> Resolved:
        """The settings one request decodes with (see the module docstring)."""
        if self.admin_off or not self.default.enabled:
            return Resolved(FULL_DEPTH, source="off")
        resolved = self._choose(requested, task)
        if self.fallback and resolved.settings.enabled:
            # Full depth, but exits are still decided and shadow-checked (drift recovery).
            resolved.settings = replace(resolved.settings, observe=True)
        return resolved

    def _choose(self, requested: EarlyExitSettings | None, task: str | None) -> Resolved:
        if requested is None:
            if task is not None and task in self.task_presets:
                return Resolved(self.task_presets[task], source=f"task:{task}")
            return Resolved(self.default)
        if self.allow_aggressive:
            return Resolved(requested, source="request")
        capped = cap(requested, self.default)
        return Resolved(capped, capped != requested, "request")
