"""Speed/quality presets and the early-exit settings shared by the CLI, the server and the engine.

A preset is the user-facing scale: an entropy threshold (nats, of the exit distribution) and the
minimum share of layers a token must pass before it may leave. A preset overrides an explicit
threshold; no threshold and no preset means full depth.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum


class SpeedQuality(str, Enum):
    quality = "quality"
    balanced = "balanced"
    fast = "fast"


@dataclass(frozen=True)
class Preset:
    threshold: float
    min_layers_fraction: float


PRESETS: dict[SpeedQuality, Preset] = {
    SpeedQuality.quality: Preset(threshold=0.1, min_layers_fraction=0.75),
    SpeedQuality.balanced: Preset(threshold=0.3, min_layers_fraction=0.50),
    SpeedQuality.fast: Preset(threshold=0.5, min_layers_fraction=0.25),
}

# --dtype: "auto" picks the fastest exact layout; "native" keeps the checkpoint's own; q8/q4 are
# 8/4-bit weights on Octomil's CPU kernel (octomil.quant).
WEIGHT_LAYOUTS = ("auto", "native", "float32", "bfloat16", "float16", "q8", "q4")

# With an explicit threshold and no preset, tokens may leave from half depth on.
DEFAULT_MIN_LAYERS_FRACTION = 0.5


class ConfigError(ValueError):
    """A user-supplied setting is out of range; the message names the setting."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class EarlyExitSettings:
    """Resolved early-exit settings; ``threshold is None`` means full depth."""

    threshold: float | None = None
    min_layers_fraction: float = DEFAULT_MIN_LAYERS_FRACTION
    preset: SpeedQuality | None = None
    # Decide exits but never take them: every token at full depth, would-be exits shadow-checked
    # (the drift alarm's fallback measures recovery this way).
    observe: bool = False

    @property
    def enabled(self) -> bool:
        return self.threshold is not None

    def min_layers(self, total_layers: int) -> int:
        """Fewest layers a token passes before an exit is allowed (at least 1)."""
        return max(1, math.ceil(self.min_layers_fraction * total_layers))

    def describe(self) -> str:
        if not self.enabled:
            return "Disabled"
        return f"Enabled: threshold={self.threshold:g}, min_layers={self.min_layers_fraction:.0%}"


def resolve_early_exit(
    preset: SpeedQuality | str | None = None,
    threshold: float | None = None,
    min_layers_fraction: float | None = None,
) -> EarlyExitSettings:
    """Combine preset / threshold into settings; a preset wins over an explicit threshold."""
    if preset is not None:
        try:
            preset = SpeedQuality(preset)
        except ValueError:
            names = ", ".join(p.value for p in SpeedQuality)
            raise ConfigError(
                f"unknown speed-quality preset {preset!r} (choose one of: {names})",
                param="speed_quality",
            ) from None
        p = PRESETS[preset]
        return EarlyExitSettings(p.threshold, p.min_layers_fraction, preset)
    if threshold is not None:
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
            raise ConfigError("early-exit threshold must be a number", param="threshold")
        if not (0.0 <= float(threshold) <= 1.0) or math.isnan(threshold):
            raise ConfigError(
                f"early-exit threshold must be within [0, 1], got {threshold}", param="threshold"
            )
    fraction = DEFAULT_MIN_LAYERS_FRACTION if min_layers_fraction is None else min_layers_fraction
    if not (0.0 < fraction <= 1.0):
        raise ConfigError(
            f"min_layers must be a fraction within (0, 1], got {fraction}", param="min_layers"
        )
    return EarlyExitSettings(None if threshold is None else float(threshold), fraction, None)
