"""Early-exit telemetry for clients: usage objects, response headers, server running totals."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from octomil.config import EarlyExitSettings
from octomil.engine.types import GenerationStats, TokenEvent
from octomil.server.protocol_responses import EarlyExitUsage, Usage
from octomil.server.speculative import speculative_usage

HEADER_EXIT_TOKENS = "X-Octomil-Early-Exit-Tokens"
HEADER_AVG_LAYERS = "X-Octomil-Avg-Layers-Used"
HEADER_TOTAL_LAYERS = "X-Octomil-Total-Layers"


def early_exit_usage(stats: GenerationStats) -> EarlyExitUsage:
    entropy = stats.avg_entropy
    return EarlyExitUsage(
        early_exit_tokens=stats.early_exit_tokens,
        exit_percentage=round(stats.exit_percentage, 2),
        avg_layers_used=round(stats.avg_layers_used, 3),
        min_layers_used=stats.min_layers_used,
        max_layers_used=stats.max_layers_used,
        avg_entropy=None if entropy is None else round(entropy, 4),
        total_layers=stats.total_layers,
        forced_tokens=stats.forced_tokens,
    )


def usage(stats: GenerationStats, prompt_tokens: int) -> Usage:
    """Exact token counts: the prompt we tokenized and the tokens the engine produced."""
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=stats.completion_tokens,
        total_tokens=prompt_tokens + stats.completion_tokens,
        early_exit=early_exit_usage(stats),
        speculative=speculative_usage(stats.speculative),
    )


def final_extras(stats: GenerationStats) -> dict[str, Any]:
    """Figures in a stream's last chunk: early exit, and speculation when the request drafted."""
    extras: dict[str, Any] = {"early_exit": early_exit_usage(stats).model_dump()}
    if (spec := speculative_usage(stats.speculative)) is not None:
        extras["speculative"] = spec.model_dump()
    return extras


def headers(stats: GenerationStats) -> dict[str, str]:
    return {
        HEADER_EXIT_TOKENS: str(stats.early_exit_tokens),
        HEADER_AVG_LAYERS: f"{stats.avg_layers_used:.1f}",
        HEADER_TOTAL_LAYERS: str(stats.total_layers),
    }


@dataclass
class EarlyExitTotals:
    """Running totals since the server started, for ``GET /v1/early-exit/stats``."""

    total_layers: int
    settings: EarlyExitSettings
    requests: int = 0
    tokens: int = 0
    early_exit_tokens: int = 0
    layers_used_sum: int = 0
    exit_layers: Counter[int] = field(default_factory=Counter)
    checks_placed: tuple[int, ...] = ()  # where the default settings check; () = full depth
    reason: str = "configured"  # why early exit is on or off (ExitControl.reason)

    def record_token(self, event: TokenEvent) -> None:
        self.tokens += 1
        self.layers_used_sum += event.layers_used
        if event.exited_early:
            self.early_exit_tokens += 1
            self.exit_layers[event.layers_used] += 1

    def as_dict(self) -> dict[str, Any]:
        s = self.settings
        return {
            "object": "early_exit.stats",
            "enabled": s.enabled,
            "reason": self.reason,
            "effective": bool(self.checks_placed),
            "checks_after_layers": list(self.checks_placed),
            "threshold": s.threshold,
            "preset": s.preset.value if s.preset else None,
            "min_layers": s.min_layers(self.total_layers) if s.enabled else self.total_layers,
            "min_layers_fraction": s.min_layers_fraction,
            "total_layers": self.total_layers,
            "requests": self.requests,
            "tokens": self.tokens,
            "early_exit_tokens": self.early_exit_tokens,
            "exit_percentage": round(100.0 * self.early_exit_tokens / self.tokens, 2)
            if self.tokens
            else 0.0,
            "avg_layers_used": round(self.layers_used_sum / self.tokens, 3) if self.tokens else 0.0,
            "exit_layer_counts": {str(k): v for k, v in sorted(self.exit_layers.items())},
        }
