"""``octomil serve --ray``: the server as Ray Serve replicas behind Ray's HTTP proxy.

Joins the cluster named by ``RAY_ADDRESS``, or starts a local one (``address="local"``: never a
cluster some other process left running on this machine). The proxy listens on ``--host`` and
``--port``; the app is deployed at route prefix ``/`` so clients see the same URLs as plain
``octomil serve``. The command blocks until SIGINT/SIGTERM, then deletes the app (replicas finish
their requests first) and, for a local cluster, stops Ray.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from octomil.cli_common import fail
from octomil.config import ConfigError
from octomil.server.cli_serve import _bind, exposure_warning
from octomil.server.serve_flags import ServeFlags
from octomil.server.serving import ServeOptions

if TYPE_CHECKING:
    from octomil.server.ray_deployment import ReplicaSpec, Scaling


@dataclass(frozen=True)
class RayFlags:
    """``--replicas N`` alone: N fixed replicas. With ``--min-replicas``/``--max-replicas``:
    autoscaled between the bounds (default 1 and N), starting at N."""

    replicas: int
    min_replicas: int | None
    max_replicas: int | None
    replica_cpus: float
    metrics_port: int | None

    @property
    def bounds(self) -> tuple[int, int]:
        if self.min_replicas is None and self.max_replicas is None:
            return self.replicas, self.replicas
        low = 1 if self.min_replicas is None else self.min_replicas
        high = self.replicas if self.max_replicas is None else self.max_replicas
        return low, high

    def check(self) -> None:
        if self.replicas < 1:
            raise ConfigError(f"--replicas must be >= 1, got {self.replicas}")
        low, high = self.bounds
        if low < 1:
            raise ConfigError(f"--min-replicas must be >= 1, got {low}")
        if not low <= self.replicas <= high:
            raise ConfigError(
                f"--replicas {self.replicas} must lie within --min-replicas {low} and "
                f"--max-replicas {high}"
            )
        if self.replica_cpus <= 0:
            raise ConfigError(f"--replica-cpus must be > 0, got {self.replica_cpus}")
        if self.metrics_port is not None and not 0 < self.metrics_port <= 65535 - high:
            raise ConfigError(
                f"--metrics-port must leave room for {high} replica ports below 65536, "
                f"got {self.metrics_port}"
            )


def plan(flags: ServeFlags, ray_flags: RayFlags) -> tuple[ReplicaSpec, Scaling]:
    """What every replica runs, and how many of them: from the ``octomil serve`` flags."""
    from octomil.server.ray_deployment import ReplicaSpec, Scaling

    low, high = ray_flags.bounds
    spec = ReplicaSpec(
        model=flags.model,
        settings=flags.settings,
        dtype=flags.dtype,
        exit_policy=flags.exit_policy,
        max_batch_size=flags.max_batch_size,
        max_kv_tokens=flags.max_kv_tokens,
        prefill_chunk=flags.max_prefill_tokens_per_step,
        options=ServeOptions(
            api_key=flags.api_key,
            max_concurrency=flags.max_concurrency,
            telemetry_headers=flags.telemetry_headers,
            default_max_tokens=flags.default_max_tokens,
        ),
        metrics_host=flags.host,
        metrics_port=ray_flags.metrics_port,
    )
    scaling = Scaling(
        min_replicas=low,
        max_replicas=high,
        initial_replicas=ray_flags.replicas,
        target_ongoing_requests=float(flags.max_batch_size),
        cpus_per_replica=ray_flags.replica_cpus,
        max_ongoing_requests=flags.max_concurrency,
        graceful_shutdown_timeout_s=flags.shutdown_timeout,
    )
    return spec, scaling


def run(flags: ServeFlags, ray_flags: RayFlags) -> None:
    try:
        ray_flags.check()
    except ConfigError as exc:
        fail(str(exc))
    # Ray reports usage to a remote service unless told not to; this server stays offline.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        import ray
        from ray import serve
    except ImportError:
        fail("--ray needs Ray Serve: pip install 'octomil[ray]'")
    from octomil.server.ray_deployment import APP_NAME, build
    from octomil.server.ray_proxy_errors import IMPORT_PATH

    # Ray's proxy binds the port itself; a busy port should still fail before any replica loads.
    probe = _bind(flags.host, flags.port)
    warning = exposure_warning(probe, flags.api_key)
    probe.close()

    spec, scaling = plan(flags, ray_flags)
    low, high = ray_flags.bounds
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
        print(f"[ray] Joined the Ray cluster at {address}", flush=True)
    else:
        # The proxy's own errors (a replica died mid-request) in the OpenAI shape; the proxy
        # inherits this environment. A joined cluster needs it set where it was started.
        os.environ.setdefault("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", IMPORT_PATH)
        # Ray's CPUs are scheduling units: enough for every replica even when the cores are
        # fewer (the replicas then share them).
        cpus = max(os.cpu_count() or 1, int(high * ray_flags.replica_cpus + 0.999))
        ray.init(
            address="local",
            num_cpus=cpus,
            include_dashboard=False,
            logging_level=logging.WARNING,
            _node_ip_address="127.0.0.1" if flags.host.startswith("127.") else None,
        )
        print(f"[ray] Started a local Ray cluster ({cpus} CPUs)", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which installs its own
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": flags.host, "port": flags.port})
        serve.run(build(spec, scaling), name=APP_NAME, route_prefix="/", blocking=False)
        info = serve.get_app_handle(APP_NAME).describe.remote().result()
        print(f"[engine] Selected: {info['selection']}", flush=True)
        print(f"[early-exit] {info['early_exit']}", flush=True)
        scale = (
            f"{low} replicas"
            if low == high
            else f"{ray_flags.replicas} replicas, autoscaled {low}..{high} on ongoing requests"
        )
        print(f"[serve] Listening on http://{flags.host}:{flags.port} (Ray Serve, {scale})")
        if ray_flags.metrics_port is not None:
            last = ray_flags.metrics_port + high - 1
            print(
                f"[serve] Replica metrics on http://{flags.host}:"
                f"{ray_flags.metrics_port}..{last}/metrics (port = base + the replica's rank)"
            )
        if flags.settings.enabled and info["policy"]:
            print(f"[early-exit] Policy: {info['policy']}")
        if warning:
            print(warning, file=sys.stderr)
        sys.stdout.flush()
        while not stop.wait(0.5):
            pass
        print("[serve] Stopping: replicas finish their requests first", flush=True)
    finally:
        # Bounded: when Ray's own processes are gone too (a signal sent to the whole process
        # group reaches them), Serve's shutdown would wait for them forever.
        stopper = threading.Thread(
            target=(lambda: serve.delete(APP_NAME)) if address else serve.shutdown, daemon=True
        )
        stopper.start()
        stopper.join(flags.shutdown_timeout + 30.0)
        ray.shutdown()
