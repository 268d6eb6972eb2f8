"""``create_app()``: the FastAPI application factory; the model is loaded by the lifespan.

The app receives an :class:`EngineClient` (whose worker thread loads the model) or builds one from
a loader. ``/health`` answers 503 until the model is loaded; the ``octomil serve`` CLI waits for
the load before it starts listening, so the startup lines come out in order.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

import octomil
from octomil.config import EarlyExitSettings
from octomil.engine.scheduler import StepOutput
from octomil.server import (
    exit_report,
    memory_metrics,
    routes_admin,
    routes_chat,
    routes_completions,
    routes_misc,
)
from octomil.server.access import AccessMiddleware
from octomil.server.drift import DriftAlarm, ShadowMetrics, default_budget
from octomil.server.engine_client import EngineClient, EngineLike
from octomil.server.errors import install_error_handlers
from octomil.server.exit_control import ExitControl
from octomil.server.heap_trim import HeapTrimmer
from octomil.server.limits import InFlight, RateLimiter
from octomil.server.metrics import ServerMetrics
from octomil.server.middleware import BodyLimitMiddleware, RequestMetricsMiddleware
from octomil.server.request_context import RequestIdMiddleware
from octomil.server.serving import ServeOptions, ServingState
from octomil.server.telemetry import EarlyExitTotals

logger = logging.getLogger("octomil.server")


def build_state(engine: EngineLike, client: EngineClient, options: ServeOptions) -> ServingState:
    settings: EarlyExitSettings = getattr(engine, "default_early_exit", EarlyExitSettings())
    effective = getattr(engine, "effective_early_exit", None)  # the real Engine has it
    checks = tuple(effective.exit_layers) if effective is not None else ()
    metrics = ServerMetrics(engine.model_id, engine.total_layers, settings, checks)
    metrics.batch.watch(client.step_age, client.scheduler_config.max_kv_tokens)
    memory_metrics.watch(metrics.registry, engine.model_id)

    def on_step(out: StepOutput, c: EngineClient) -> None:
        metrics.set_queue(c.waiting, c.running)
        metrics.batch.record_step(out.batch_size, out.prefill_tokens, c.kv_tokens_reserved)

    client.on_step = on_step
    control = ExitControl(
        settings,
        allow_aggressive=options.allow_aggressive_overrides,
        task_presets=dict(options.task_presets),
    )
    totals = EarlyExitTotals(engine.total_layers, settings, checks_placed=checks)
    report = exit_report.reporter(engine, metrics, totals)
    control.listeners.append(report)
    report(control)
    drift = None
    if options.shadow_rate > 0:
        engine.shadow_rate = options.shadow_rate  # type: ignore[union-attr]
        budget = getattr(engine, "disagreement_budget", lambda s: None)

        def budget_of(s: EarlyExitSettings) -> float:
            if options.drift_budget is not None:
                return options.drift_budget
            calibrated = budget(s)
            return default_budget(s) if calibrated is None else calibrated

        drift = DriftAlarm(
            control,
            ShadowMetrics(metrics.registry, engine.model_id),
            budget_of,
            window=options.drift_window,
            margin=options.drift_margin,
            auto_fallback=options.auto_fallback,
        )
    return ServingState(
        engine=engine,
        client=client,
        metrics=metrics,
        totals=totals,
        options=options,
        default_early_exit=settings,
        control=control,
        drift=drift,
    )


def create_app(
    client: EngineClient | None = None,
    *,
    loader: Callable[[], EngineLike] | None = None,
    options: ServeOptions | None = None,
) -> FastAPI:
    """Build the app around an engine client, or a ``loader`` run on a new client's worker."""
    if (client is None) == (loader is None):
        raise ValueError("pass exactly one of client or loader")
    options = options or ServeOptions()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        nonlocal client
        if client is None:
            assert loader is not None
            client = EngineClient(loader, max_concurrency=options.max_concurrency)
        app.state.started_at = int(time.time())
        app.state.serving = None
        app.state.load_error = None

        async def activate() -> None:
            assert client is not None
            try:
                engine = await client.loaded()
            except Exception as exc:  # noqa: BLE001 - /health reports it
                app.state.load_error = str(exc)
                logger.error("model failed to load: %s", exc)
                return
            app.state.serving = build_state(engine, client, options)

        task = asyncio.create_task(activate())
        trimmer = asyncio.create_task(HeapTrimmer(options.heap_trim_interval).run())
        try:
            yield
        finally:
            task.cancel()
            trimmer.cancel()
            app.state.serving = None
            client.close()

    app = FastAPI(
        title="Octomil",
        version=octomil.__version__,
        description="OpenAI-compatible LLM server on MLX with entropy-based early exit.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.include_router(routes_chat.router)
    app.include_router(routes_completions.router)
    app.include_router(routes_misc.router)
    app.include_router(routes_admin.router)
    # Added last = outermost: metrics see every status, including 401, 413 and 429; keys are
    # checked before the body is read; every response carries its request id.
    app.add_middleware(BodyLimitMiddleware, max_bytes=options.max_body_bytes)
    app.add_middleware(
        AccessMiddleware,
        keys=options.keys,
        rate=RateLimiter(options.rate_limit) if options.rate_limit else None,
        in_flight=InFlight(options.max_streams_per_key) if options.max_streams_per_key else None,
    )
    app.add_middleware(RequestMetricsMiddleware)
    app.add_middleware(RequestIdMiddleware)
    return app
