"""The Octomil server as a Ray Serve deployment: N replicas of the same app behind Ray's proxy.

Each replica is a Ray actor that loads the model once (its constructor waits for the engine
client's worker to finish loading) and then serves the very app ``octomil serve`` serves —
``create_app()`` with the same routes, middleware, errors and telemetry headers — through Ray
Serve's late-bound ingress (``__serve_build_asgi_app__``), so the app's lifespan runs inside the
replica as under uvicorn. Ray's HTTP proxy routes each request to a replica and streams ASGI
messages back, so SSE streams pass through unchanged.

Added on top: ``X-Octomil-Replica`` on every response, a per-replica ``/metrics`` listener
(:mod:`octomil.server.replica_metrics`), and a Serve health check that fails when the engine
worker stopped or stalled, so Ray replaces that replica.

Request fate when a replica dies (Ray Serve's router): a request not yet taken by a replica is
routed to a live one; a request a replica has taken fails with the replica (the proxy answers
5xx, or a stream ends without ``[DONE]``). Clients retry those: the OpenAI SDK retries 5xx twice
by default. Scaling down and ``serve.shutdown`` are graceful: a replica stops taking requests
and finishes the ones it has (up to ``graceful_shutdown_timeout_s``).

Autoscaling follows ongoing requests per replica; the target is the engine's batch size: a
replica whose batch is full is the signal that another replica would help.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from typing import Any

from fastapi import FastAPI
from ray import serve

from octomil.config import EarlyExitSettings
from octomil.server.app import create_app
from octomil.server.engine_client import EngineClient
from octomil.server.replica_header import ReplicaHeaderMiddleware
from octomil.server.replica_metrics import serve_metrics
from octomil.server.routes_misc import ENGINE_STALL_S
from octomil.server.serving import ServeOptions

logger = logging.getLogger("octomil.server")

APP_NAME = "octomil"
DEPLOYMENT_NAME = "Octomil"


@dataclass(frozen=True)
class ReplicaSpec:
    """What every replica needs to build its engine and app (pickled to the replica actors)."""

    model: str | None
    settings: EarlyExitSettings
    dtype: str
    exit_policy: str | None
    max_batch_size: int
    max_kv_tokens: int | None
    prefill_chunk: int
    options: ServeOptions
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = None  # base port; replica listens on base + its rank on the node


@dataclass(frozen=True)
class Scaling:
    """Replica count: fixed (``min == max``) or autoscaled between the bounds."""

    min_replicas: int
    max_replicas: int
    initial_replicas: int
    target_ongoing_requests: float
    cpus_per_replica: float
    max_ongoing_requests: int
    graceful_shutdown_timeout_s: float

    @property
    def fixed(self) -> bool:
        return self.min_replicas == self.max_replicas

    def deployment_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {
            "ray_actor_options": {"num_cpus": self.cpus_per_replica},
            "max_ongoing_requests": self.max_ongoing_requests,
            "graceful_shutdown_timeout_s": self.graceful_shutdown_timeout_s,
            # Loading the model takes seconds; the default health check period is fine after.
            "health_check_period_s": 5.0,
            "health_check_timeout_s": 30.0,
        }
        if self.fixed:
            options["num_replicas"] = self.min_replicas
        else:
            options["autoscaling_config"] = {
                "min_replicas": self.min_replicas,
                "max_replicas": self.max_replicas,
                "initial_replicas": self.initial_replicas,
                "target_ongoing_requests": self.target_ongoing_requests,
            }
        return options


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress()
class OctomilReplica:
    """One replica: an engine client (its worker loads the model) and the Octomil app."""

    async def __init__(self, spec: ReplicaSpec) -> None:
        from octomil.engine.engine import Engine

        context = serve.get_replica_context()
        self.replica = context.replica_id.unique_id
        # The rank among this deployment's replicas on this node: ports stay distinct per node,
        # and one replica per node (a Kubernetes pod) always gets the base port.
        rank = getattr(context.rank, "local_rank", 0)
        self.spec = spec
        self.octomil_app: FastAPI | None = None
        self.metrics_server: ThreadingHTTPServer | None = None
        self.client = EngineClient(
            lambda: Engine.load(
                spec.model,
                dtype=spec.dtype,
                early_exit=spec.settings,
                exit_policy=spec.exit_policy,
            ),
            max_concurrency=spec.options.max_concurrency,
            max_batch_size=spec.max_batch_size,
            max_kv_tokens=spec.max_kv_tokens or "auto",
            prefill_chunk=spec.prefill_chunk,
        )
        # A failed load raises here: Ray reports the constructor error and retries the replica.
        await self.client.loaded()
        if spec.metrics_port is not None:
            self.metrics_server = serve_metrics(
                self._render_metrics, spec.metrics_host, spec.metrics_port + int(rank)
            )

    def __serve_build_asgi_app__(self) -> FastAPI:
        app = create_app(self.client, options=self.spec.options)
        app.add_middleware(ReplicaHeaderMiddleware, replica=self.replica)  # outermost
        self.octomil_app = app
        return app

    def _render_metrics(self) -> bytes | None:
        app = self.octomil_app
        serving = getattr(app.state, "serving", None) if app is not None else None
        return None if serving is None else serving.metrics.render()

    def check_health(self) -> None:
        """Ray Serve's health probe: raising makes the controller replace this replica."""
        if not self.client.ready:
            raise RuntimeError("the engine worker has stopped")
        age = self.client.step_age()
        if age > ENGINE_STALL_S:
            raise RuntimeError(f"the engine has not finished a step for {age:.0f} s")

    def describe(self) -> dict[str, str]:
        """The startup lines' facts, asked once by ``octomil serve --ray`` through a handle."""
        engine = self.client.engine
        effective = getattr(engine, "effective_early_exit", None)
        choice = getattr(engine, "exit_choice", None)
        return {
            "replica": self.replica,
            "selection": str(getattr(engine, "selection", engine.model_id)),
            "early_exit": effective.describe() if effective is not None else "",
            "policy": choice.status if choice is not None else "",
        }

    def __del__(self) -> None:
        # Serve calls this after the replica's requests finished (graceful stop).
        server = getattr(self, "metrics_server", None)
        if server is not None:
            server.shutdown()
        if hasattr(self, "client"):
            self.client.close()


def build(spec: ReplicaSpec, scaling: Scaling) -> serve.Application:
    """The bound application for ``serve.run``."""
    return OctomilReplica.options(**scaling.deployment_options()).bind(spec)
