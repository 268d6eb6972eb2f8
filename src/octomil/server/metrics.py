"""Prometheus metrics: prefixed ``octomil_``, unit-suffixed, explicit buckets, a ``model`` label.

Each app owns its own ``CollectorRegistry`` (several apps can live in one test process).
Average layers used over time is ``rate(octomil_layers_used_per_token_sum[1m]) /
rate(octomil_layers_used_per_token_count[1m])``; the early-exit share is
``rate(octomil_early_exit_tokens_total[1m]) / rate(octomil_generation_tokens_total[1m])``.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

from octomil.config import EarlyExitSettings
from octomil.engine.types import TokenEvent
from octomil.server.batch_metrics import BatchMetrics
from octomil.server.speculative import SpeculativeMetrics

# Seconds. TTFT on this CPU spans ~50 ms (short prompt) to tens of seconds (long prompt, queued).
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0)
TOKEN_COUNT_BUCKETS = (1, 4, 16, 64, 128, 256, 512, 1024, 2048, 4096, 8192)

CONTENT_TYPE = CONTENT_TYPE_LATEST

# The *_created series double the output and no dashboard uses them (vLLM turns them off too).
disable_created_metrics()


class ServerMetrics:
    """All series the server exports, pre-bound to one model label."""

    def __init__(
        self,
        model: str,
        total_layers: int,
        settings: EarlyExitSettings,
        checks_placed: tuple[int, ...] = (),
    ) -> None:
        self.registry = CollectorRegistry()
        self.model = model
        r = self.registry
        m = ["model"]
        self.requests = Counter(
            "octomil_requests",
            "HTTP requests by endpoint and status code.",
            [*m, "endpoint", "status"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "octomil_prompt_tokens", "Prompt tokens processed.", m, registry=r
        ).labels(model)
        self.generation_tokens = Counter(
            "octomil_generation_tokens", "Tokens generated.", m, registry=r
        ).labels(model)
        self.request_finished = Counter(
            "octomil_request_finished",
            "Finished generations by finish reason.",
            [*m, "finish_reason"],
            registry=r,
        )
        self.ttft = Histogram(
            "octomil_time_to_first_token_seconds",
            "Time from request arrival to first token.",
            m,
            buckets=TTFT_BUCKETS,
            registry=r,
        ).labels(model)
        self.itl = Histogram(
            "octomil_inter_token_latency_seconds",
            "Time between consecutive tokens of a request.",
            m,
            buckets=ITL_BUCKETS,
            registry=r,
        ).labels(model)
        self.e2e = Histogram(
            "octomil_e2e_request_latency_seconds",
            "Time from request arrival to last token.",
            m,
            buckets=E2E_BUCKETS,
            registry=r,
        ).labels(model)
        self.prompt_tokens_per_request = Histogram(
            "octomil_request_prompt_tokens",
            "Prompt length of each request (tokens).",
            m,
            buckets=TOKEN_COUNT_BUCKETS,
            registry=r,
        ).labels(model)
        self.waiting = Gauge(
            "octomil_requests_waiting",
            "Requests admitted and waiting for the engine.",
            m,
            registry=r,
        ).labels(model)
        self.running = Gauge(
            "octomil_requests_running", "Requests being generated now.", m, registry=r
        ).labels(model)
        self.early_exit_tokens = Counter(
            "octomil_early_exit_tokens", "Tokens that left the layer stack early.", m, registry=r
        ).labels(model)
        self.forced_tokens = Counter(
            "octomil_forced_tokens",
            "Tokens a grammar forced, emitted without a model pass (fast-forward).",
            m,
            registry=r,
        ).labels(model)
        self.layers_used = Histogram(
            "octomil_layers_used_per_token",
            "Decoder layers each generated token passed through.",
            m,
            buckets=tuple(range(1, total_layers + 1)),
            registry=r,
        ).labels(model)
        self._exit_layer = Counter(
            "octomil_exit_layer",
            "Early-exited tokens by the layer they left at (1-based).",
            [*m, "layer"],
            registry=r,
        )
        self.threshold = Gauge(
            "octomil_early_exit_threshold",
            "Configured default entropy threshold (nats); 0 with octomil_early_exit_enabled 0.",
            m,
            registry=r,
        ).labels(model)
        # One series at a time: its reason says why early exit is on or off now (configured,
        # not_configured, admin_set, admin_off, drift_fallback).
        self._enabled = Gauge(
            "octomil_early_exit_enabled",
            "1 when early exit is on by default (a preset or threshold, not switched off), by "
            "reason; whether any token can exit is octomil_early_exit_effective.",
            [*m, "reason"],
            registry=r,
        )
        # What the exit policy makes of the settings on this machine: it may place no check.
        self.effective = Gauge(
            "octomil_early_exit_effective",
            "1 when the default settings place at least one exit check; 0: full depth.",
            m,
            registry=r,
        ).labels(model)
        self.checks_placed = Gauge(
            "octomil_early_exit_checks_placed",
            "Depths where the default settings check for an exit (0: full depth).",
            m,
            registry=r,
        ).labels(model)
        self.min_layers = Gauge(
            "octomil_early_exit_min_layers",
            "Fewest layers a token passes before it may exit.",
            m,
            registry=r,
        ).labels(model)
        self.total_layers = Gauge(
            "octomil_total_layers", "Decoder layers in the served model.", m, registry=r
        ).labels(model)
        self.total_layers.set(total_layers)
        self.set_settings(settings, total_layers, checks_placed)
        self.batch = BatchMetrics(r, model)
        self.speculative = SpeculativeMetrics(r, model)

    def set_settings(
        self,
        settings: EarlyExitSettings,
        total_layers: int,
        checks_placed: tuple[int, ...] = (),
        reason: str | None = None,
    ) -> None:
        """``reason`` None: the startup settings (configured or not_configured)."""
        self.threshold.set(settings.threshold or 0.0)
        if reason is None:
            reason = "configured" if settings.enabled else "not_configured"
        self.set_enabled(settings.enabled, reason)
        self.min_layers.set(settings.min_layers(total_layers) if settings.enabled else total_layers)
        self.effective.set(1 if checks_placed else 0)
        self.checks_placed.set(len(checks_placed))

    def set_enabled(self, enabled: bool, reason: str) -> None:
        self._enabled.clear()
        self._enabled.labels(self.model, reason).set(1 if enabled else 0)

    def record_request(self, endpoint: str, status: int) -> None:
        self.requests.labels(self.model, endpoint, str(status)).inc()

    def set_queue(self, waiting: int, running: int) -> None:
        self.waiting.set(waiting)
        self.running.set(running)

    def record_token(self, event: TokenEvent) -> None:
        self.generation_tokens.inc()
        if event.forced:
            self.forced_tokens.inc()
            return
        self.layers_used.observe(event.layers_used)
        if event.exited_early:
            self.early_exit_tokens.inc()
            self._exit_layer.labels(self.model, str(event.layers_used)).inc()

    def record_finished(self, finish_reason: str) -> None:
        self.request_finished.labels(self.model, finish_reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
