"""Prometheus series of the engine's continuous batching: batch sizes, prefill, KV, liveness.

Recorded by the engine worker after every scheduler step (``EngineClient.on_step``); the step
age is read at scrape time, so a stuck engine shows a growing value even when nothing records.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Gauge, Histogram

BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
PREFILL_BUCKETS = (0, 16, 32, 64, 128, 256, 512, 1024, 2048)


class BatchMetrics:
    def __init__(self, registry: CollectorRegistry, model: str) -> None:
        m = ["model"]
        self.batch_size = Histogram(
            "octomil_batch_size",
            "Sequences decoded together in one engine step.",
            m,
            buckets=BATCH_BUCKETS,
            registry=registry,
        ).labels(model)
        self.prefill_tokens = Histogram(
            "octomil_prefill_tokens_per_step",
            "Prompt tokens fed in one engine step (steps that fed any).",
            m,
            buckets=PREFILL_BUCKETS,
            registry=registry,
        ).labels(model)
        self.kv_tokens = Gauge(
            "octomil_kv_cache_tokens",
            "KV cache positions reserved by admitted requests (prompt + max_tokens).",
            m,
            registry=registry,
        ).labels(model)
        self.kv_budget = Gauge(
            "octomil_kv_cache_tokens_budget",
            "KV cache positions the server admits at most (--max-kv-tokens; 0: unbounded).",
            m,
            registry=registry,
        ).labels(model)
        self.step_age = Gauge(
            "octomil_engine_step_age_seconds",
            "Seconds since the engine last finished a step while it had work (0 when idle).",
            m,
            registry=registry,
        ).labels(model)

    def watch(self, step_age: Callable[[], float], kv_budget: int | None) -> None:
        self.step_age.set_function(step_age)
        self.kv_budget.set(kv_budget or 0)

    def record_step(self, batch_size: int, prefill_tokens: int, kv_tokens: int) -> None:
        if batch_size:
            self.batch_size.observe(batch_size)
        if prefill_tokens:
            self.prefill_tokens.observe(prefill_tokens)
        self.kv_tokens.set(kv_tokens)
