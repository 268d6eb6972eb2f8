"""``octomil serve`` and ``octomil models``: registered on the main Typer app by ``register(app)``.

Heavy imports (the engine, MLX, uvicorn, FastAPI) happen inside the commands so ``--help`` is
instant. Every flag is checked before anything loads (:meth:`ServeFlags.check`); a user error
ends the process with one ``error:`` line on stderr and exit status 2.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
import sys
from typing import Annotated

import typer

from octomil.cli_common import (
    fail,
)
from octomil.cli_speculative import speculative_settings
from octomil.config import ConfigError
from octomil.server.heap_trim import DEFAULT_INTERVAL_S
from octomil.server.serve_flags import (
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_PREFILL_CHUNK,
    PRESET_NAMES,
    ServeFlags,
    serve_flags,
)


def _bind(host: str, port: int) -> socket.socket:
    """Bind the listening socket before the model loads, so a busy port fails fast."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        fail(f"cannot resolve host {host!r}: {exc.strerror}")
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            fail(f"port {port} on {host} is already in use (choose another with --port)")
        fail(f"cannot listen on {host}:{port}: {exc.strerror}")
    sock.set_inheritable(True)
    return sock


def serve(
    model: Annotated[
        str | None,
        typer.Argument(
            help="Model alias (see `octomil models`), local path or HF repo id. "
            "Default: the embedded SmolLM2-135M-Instruct."
        ),
    ] = None,
    early_exit_threshold: Annotated[
        float | None,
        typer.Option(
            help="Entropy threshold in [0, 1] (nats); enables early exit.",
            envvar="OCTOMIL_EARLY_EXIT_THRESHOLD",
        ),
    ] = None,
    speed_quality: Annotated[
        str | None,
        typer.Option(
            help=f"Preset ({PRESET_NAMES}); overrides --early-exit-threshold.",
            envvar="OCTOMIL_SPEED_QUALITY",
        ),
    ] = None,
    host: Annotated[str, typer.Option(help="Interface to listen on.", envvar="OCTOMIL_HOST")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(help="TCP port.", envvar="OCTOMIL_PORT")] = 8080,
    api_key: Annotated[
        list[str] | None,
        typer.Option(
            help="Require 'Authorization: Bearer KEY' on /v1/*; repeat for several keys.",
            envvar="OCTOMIL_API_KEY",
        ),
    ] = None,
    api_keys_file: Annotated[
        str | None,
        typer.Option(
            help="File of API keys, one per line (# comments).", envvar="OCTOMIL_API_KEYS_FILE"
        ),
    ] = None,
    admin_key: Annotated[
        str | None,
        typer.Option(
            help="Key for /admin/* (the early-exit kill switch); without it /admin is closed.",
            envvar="OCTOMIL_ADMIN_KEY",
        ),
    ] = None,
    rate_limit: Annotated[
        str | None,
        typer.Option(help="Generation requests per key (or client address), e.g. 60/min, 5/10s."),
    ] = None,
    max_streams_per_key: Annotated[
        int | None, typer.Option(help="Generations in flight per key; more get HTTP 429.")
    ] = None,
    max_body_bytes: Annotated[int, typer.Option(help="Largest request body (HTTP 413).")] = (
        4 * 1024 * 1024
    ),
    max_prompt_tokens: Annotated[
        int | None, typer.Option(help="Longest prompt in tokens (HTTP 400 prompt_too_long).")
    ] = None,
    max_tokens_limit: Annotated[
        int | None,
        typer.Option(
            help="Largest max_tokens a request may ask for (HTTP 400); also caps the default."
        ),
    ] = None,
    max_messages: Annotated[
        int | None, typer.Option(help="Most chat messages in one request (HTTP 400).")
    ] = None,
    request_timeout: Annotated[
        float | None,
        typer.Option(
            help="Seconds a generation may take; then it is ended (HTTP 504 / error event)."
        ),
    ] = None,
    log_format: Annotated[
        str, typer.Option(help="Log lines as text or json (one object per line, with request_id).")
    ] = "text",
    allow_aggressive_overrides: Annotated[
        bool,
        typer.Option(
            help="Let a request's early_exit go beyond the server default (higher threshold, "
            "fewer layers); by default such a request is capped at the default."
        ),
    ] = False,
    max_concurrency: Annotated[
        int,
        typer.Option(
            help="Requests waiting or running at once; more get HTTP 429.",
            envvar="OCTOMIL_MAX_CONCURRENCY",
        ),
    ] = 64,
    max_batch_size: Annotated[
        int,
        typer.Option(
            help="Sequences decoded together in one step (one read of the weights); 1 = no "
            "batching.",
            envvar="OCTOMIL_MAX_BATCH_SIZE",
        ),
    ] = DEFAULT_MAX_BATCH_SIZE,
    max_prefill_tokens_per_step: Annotated[
        int,
        typer.Option(
            help="Prompt tokens read per engine step: a long prompt is read in chunks of this "
            "size between the decode steps of the running streams.",
            envvar="OCTOMIL_MAX_PREFILL_TOKENS_PER_STEP",
        ),
    ] = DEFAULT_PREFILL_CHUNK,
    max_kv_tokens: Annotated[
        int | None,
        typer.Option(
            help="KV cache positions (prompt + max_tokens of admitted requests) at most; "
            "requests beyond wait. Default: 40% of memory.",
            envvar="OCTOMIL_MAX_KV_TOKENS",
        ),
    ] = None,
    shutdown_timeout: Annotated[
        float,
        typer.Option(
            help="On SIGTERM/SIGINT: seconds in-flight requests may take to finish before they "
            "are ended with an error event.",
            envvar="OCTOMIL_SHUTDOWN_TIMEOUT",
        ),
    ] = 30.0,
    default_max_tokens: Annotated[
        int, typer.Option(help="max_tokens when a request does not set one.")
    ] = 512,
    telemetry_headers: Annotated[
        bool,
        typer.Option(
            "--telemetry-headers/--no-telemetry-headers",
            help="Send X-Octomil-* early-exit headers.",
        ),
    ] = True,
    dtype: Annotated[
        str,
        typer.Option(
            help="Weight layout: auto (the faster exact one: the checkpoint's own precision or "
            "float32), native, float32, bfloat16, float16, q8, q4 (8/4-bit weights on Octomil's "
            "CPU kernel)."
        ),
    ] = "auto",
    exit_policy: Annotated[
        str | None,
        typer.Option(
            help="Exit policy: a calibrated policy directory, 'lens' (raw shared head) or 'none' "
            "(default: the calibrated policy found for the model).",
            envvar="OCTOMIL_EXIT_POLICY",
        ),
    ] = None,
    log_level: Annotated[
        str, typer.Option(help="uvicorn log level: critical, error, warning, info, debug, trace.")
    ] = "info",
    policy_file: Annotated[
        str | None,
        typer.Option(
            help="YAML exit policies: task classes -> presets, token classes that never exit "
            "early (see configs/exit-policy.example.yaml).",
            envvar="OCTOMIL_POLICY_FILE",
        ),
    ] = None,
    shadow_rate: Annotated[
        float,
        typer.Option(
            help="Share of early-exited tokens also compared with the full-depth token "
            "(octomil_shadow_* metrics); responses are never changed.",
            envvar="OCTOMIL_SHADOW_RATE",
        ),
    ] = 0.0,
    auto_fallback: Annotated[
        bool,
        typer.Option(
            help="When the drift alarm trips, serve full depth until the shadow-checked "
            "disagreement is back within the budget."
        ),
    ] = False,
    drift_window: Annotated[
        int, typer.Option(help="Shadow checks in the drift alarm's rolling window (per preset).")
    ] = 200,
    drift_margin: Annotated[
        float, typer.Option(help="The alarm trips at disagreement > budget + margin.")
    ] = 0.05,
    drift_budget: Annotated[
        float | None,
        typer.Option(
            help="Disagreement budget for the alarm (default: the exit policy's calibrated one)."
        ),
    ] = None,
    heap_trim_interval: Annotated[
        float,
        typer.Option(
            help="Every this many seconds, give the C heap's free pages back to the OS "
            "(malloc_trim), so resident memory follows use; 0: never.",
            envvar="OCTOMIL_HEAP_TRIM_INTERVAL",
        ),
    ] = DEFAULT_INTERVAL_S,
    speculative: Annotated[
        str,
        typer.Option(
            help="Speculative decoding: off, lookup (prompt-lookup drafts), auto (lookup where it "
            "pays, per request), model:NAME (a draft model with the same tokenizer).",
            envvar="OCTOMIL_SPECULATIVE",
        ),
    ] = "off",
    num_speculative_tokens: Annotated[
        int,
        typer.Option(help="Most drafted tokens verified per step (adapts below it)."),
    ] = 8,
    ray: Annotated[
        bool,
        typer.Option(
            "--ray",
            help="Serve replicas on Ray Serve behind Ray's HTTP proxy (pip install "
            "'octomil[ray]'); joins RAY_ADDRESS or starts a local Ray cluster.",
        ),
    ] = False,
    replicas: Annotated[int, typer.Option(help="With --ray: replicas to start.")] = 1,
    min_replicas: Annotated[
        int | None, typer.Option(help="With --ray: autoscale down to this many replicas.")
    ] = None,
    max_replicas: Annotated[
        int | None, typer.Option(help="With --ray: autoscale up to this many replicas.")
    ] = None,
    replica_cpus: Annotated[
        float, typer.Option(help="With --ray: Ray CPUs reserved per replica.")
    ] = 1.0,
    metrics_port: Annotated[
        int | None,
        typer.Option(help="With --ray: replica r also serves /metrics on this port + r."),
    ] = None,
) -> None:
    """Serve the OpenAI-compatible API (chat, completions, models, metrics)."""
    try:
        flags = serve_flags(locals())  # the parameters, by name (nothing else is defined yet)
        flags.check()
    except ConfigError as exc:
        fail(str(exc))
    if ray:
        from octomil.server.ray_cli import RayFlags, run

        run(flags, RayFlags(replicas, min_replicas, max_replicas, replica_cpus, metrics_port))
        return
    if (replicas, min_replicas, max_replicas, metrics_port) != (1, None, None, None):
        fail("--replicas, --min-replicas, --max-replicas and --metrics-port need --ray")
    sock = _bind(host, port)
    try:
        _run(flags, sock)
    finally:
        sock.close()


def exposure_warning(sock: socket.socket, api_key: str | None) -> str | None:
    """The startup warning for a server others can reach (not loopback) that asks for no key."""
    address = sock.getsockname()[0]
    try:
        loopback = ipaddress.ip_address(address.split("%")[0]).is_loopback
    except ValueError:
        loopback = False
    if loopback or api_key:
        return None
    return (
        f"[serve] WARNING: listening on {address} without an API key: anyone who can reach this "
        "port can use the model. Set --api-key (or OCTOMIL_API_KEY)."
    )


def _run(flags: ServeFlags, sock: socket.socket) -> None:
    import uvicorn

    from octomil.engine.engine import Engine
    from octomil.policy_file import PolicyFile, load_policy_file
    from octomil.server.app import create_app
    from octomil.server.draining import DrainingServer
    from octomil.server.engine_client import EngineClient
    from octomil.server.limits import Rate
    from octomil.server.request_context import log_config
    from octomil.server.serving import ServeOptions

    policy = load_policy_file(flags.policy_file) if flags.policy_file else PolicyFile()

    def load() -> Engine:
        engine = Engine.load(
            flags.model, dtype=flags.dtype, early_exit=flags.settings, exit_policy=flags.exit_policy
        )
        engine.set_never_exit(policy.never_exit)
        engine.default_speculative = speculative_settings(flags)
        if (draft := engine.default_speculative.draft_model) is not None:
            engine.load_draft_model(draft, flags.dtype)  # DraftModelError: a ValueError
        return engine

    client = EngineClient(
        load,
        max_concurrency=flags.max_concurrency,
        max_batch_size=flags.max_batch_size,
        max_kv_tokens=flags.max_kv_tokens or "auto",
        prefill_chunk=flags.max_prefill_tokens_per_step,
    )
    try:
        engine = client.wait_loaded()
    except KeyboardInterrupt:
        client.close(timeout=0)
        raise typer.Exit(130) from None
    except ValueError as exc:  # ModelNotAvailableError, ExitPolicyError: found while loading
        client.close()
        try:
            fail(str(exc) or type(exc).__name__)
        except typer.Exit as done:
            _leave(done.exit_code)
    print(f"[engine] Selected: {engine.selection}", flush=True)
    print(f"[early-exit] {engine.effective_early_exit.describe()}", flush=True)
    if engine.default_speculative.enabled:
        print(f"[speculative] {engine.default_speculative.describe()}", flush=True)
    print(f"[serve] Listening on http://{flags.host}:{flags.port}", flush=True)
    if flags.settings.enabled:
        print(f"[early-exit] Policy: {engine.exit_choice.status}", flush=True)
    if warning := exposure_warning(
        sock, flags.api_key or (flags.api_keys[0] if flags.api_keys else None)
    ):
        print(warning, file=sys.stderr, flush=True)
    options = ServeOptions(
        api_key=flags.api_key,
        api_keys=flags.api_keys,
        admin_key=flags.admin_key,
        rate_limit=Rate.parse(flags.rate_limit) if flags.rate_limit else None,
        max_streams_per_key=flags.max_streams_per_key,
        max_body_bytes=flags.max_body_bytes,
        max_prompt_tokens=flags.max_prompt_tokens,
        max_tokens_limit=flags.max_tokens_limit,
        max_messages=flags.max_messages,
        request_timeout=flags.request_timeout,
        allow_aggressive_overrides=flags.allow_aggressive_overrides,
        task_presets=policy.tasks,
        shadow_rate=flags.shadow_rate,
        auto_fallback=flags.auto_fallback,
        drift_window=flags.drift_window,
        drift_margin=flags.drift_margin,
        heap_trim_interval=flags.heap_trim_interval,
        drift_budget=flags.drift_budget,
        max_concurrency=flags.max_concurrency,
        telemetry_headers=flags.telemetry_headers,
        default_max_tokens=flags.default_max_tokens,
    )
    app = create_app(client, options=options)
    # uvicorn's own grace period only backs up the drain, which ends every stream in time.
    config = uvicorn.Config(
        app,
        log_level=flags.log_level,
        log_config=log_config(flags.log_format, flags.log_level),
        timeout_graceful_shutdown=10,
    )
    DrainingServer(config, client, flags.shutdown_timeout).run(sockets=[sock])
    _leave(0)  # drained: requests finished or ended, the engine thread stopped


def _leave(code: int) -> None:
    """Exit with ``code`` without running MLX's destructors.

    MLX was used on the engine's worker thread, which has ended: its per-thread stream outlives
    it, and destroying that at interpreter exit can abort the process ("terminate called without
    an active exception": status 134 after a failed load, -6 once after a drained SIGTERM in a
    20-minute soak). Nothing is left to clean up by then, so flush the logs and leave.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def models() -> None:
    """List model aliases and whether each loads offline on this machine."""
    from octomil.models import registry

    default = registry.default_model_name()
    rows = []
    for name, spec in registry.aliases().items():
        try:
            available = registry.is_available_offline(spec)
        except Exception:  # noqa: BLE001 - a broken cache entry means "not available"
            available = False
        mark = "*" if name == default else " "
        rows.append((f"{mark} {name}", "yes" if available else "no", spec.description))
    width = max(len(r[0]) for r in rows) if rows else 10
    typer.echo(f"{'  MODEL':<{width}}  OFFLINE  DESCRIPTION")
    for name, available, description in rows:
        typer.echo(f"{name:<{width}}  {available:<7}  {description}")
    typer.echo("(* = default)")
    sys.stdout.flush()


def register(app: typer.Typer) -> None:
    """Add ``serve`` and ``models`` to the main CLI app."""
    app.command("serve")(serve)
    app.command("models")(models)
