"""Speculative decoding at the HTTP edge: the per-request ``speculative`` field -> engine settings,
the ``usage.speculative`` figures, and the Prometheus counters (named after vLLM's)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter

from octomil.engine.speculation import SpeculativeSettings, SpeculativeStats
from octomil.server.protocol import SpeculativeOverride
from octomil.server.protocol_responses import SpeculativeUsage


def speculative_settings(
    engine: Any, override: bool | SpeculativeOverride | None
) -> SpeculativeSettings | None:
    """Per-request ``speculative`` field -> settings (None keeps the server default)."""
    if override is None:
        return None
    default: SpeculativeSettings = getattr(engine, "default_speculative", SpeculativeSettings())
    if override is False:
        return SpeculativeSettings("off", default.num_tokens)
    mode = default.mode if default.enabled else "auto"
    if override is True:
        return SpeculativeSettings(mode, default.num_tokens)
    return SpeculativeSettings(
        override.mode or mode, override.num_speculative_tokens or default.num_tokens
    )


def speculative_usage(stats: SpeculativeStats | None) -> SpeculativeUsage | None:
    return None if stats is None else SpeculativeUsage(**stats.as_dict())


class SpeculativeMetrics:
    """vLLM's ``spec_decode_*`` counters, summed over requests as each one ends."""

    def __init__(self, registry: CollectorRegistry, model: str) -> None:
        m = ["model"]
        self.model = model
        self.drafts = Counter(
            "octomil_spec_decode_num_drafts",
            "Verification steps that carried drafted tokens.",
            m,
            registry=registry,
        ).labels(model)
        self.draft_tokens = Counter(
            "octomil_spec_decode_num_draft_tokens",
            "Drafted tokens verified.",
            m,
            registry=registry,
        ).labels(model)
        self.accepted_tokens = Counter(
            "octomil_spec_decode_num_accepted_tokens",
            "Drafted tokens accepted (emitted without a step of their own).",
            m,
            registry=registry,
        ).labels(model)
        self._per_position = Counter(
            "octomil_spec_decode_num_accepted_tokens_per_pos",
            "Drafted tokens accepted, by position in the draft (0-based).",
            [*m, "position"],
            registry=registry,
        )

    def record(self, stats: SpeculativeStats | None) -> None:
        if stats is None or not stats.drafts:
            return
        self.drafts.inc(stats.drafts)
        self.draft_tokens.inc(stats.draft_tokens)
        self.accepted_tokens.inc(stats.accepted_tokens)
        for position, n in enumerate(stats.accepted_per_position):
            if n:
                self._per_position.labels(self.model, str(position)).inc(n)
