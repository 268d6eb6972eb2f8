"""``octomil serve`` and ``octomil models``: registered on the main Typer app by ``register(app)``.

Heavy imports (the engine, MLX, uvicorn, FastAPI) happen inside the commands so ``--help`` is
instant. Every user error ends the process with one line on stderr and a non-zero exit code.
"""

from __future__ import annotations

import errno
import socket
import sys
from typing import Annotated, NoReturn

import typer

from octomil.config import ConfigError, EarlyExitSettings, SpeedQuality, resolve_early_exit

_PRESETS = ", ".join(p.value for p in SpeedQuality)


def _fail(message: str, code: int = 2) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _bind(host: str, port: int) -> socket.socket:
    """Bind the listening socket before the model loads, so a busy port fails fast."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        _fail(f"cannot resolve host {host!r}: {exc.strerror}")
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            _fail(f"port {port} on {host} is already in use (choose another with --port)")
        _fail(f"cannot listen on {host}:{port}: {exc.strerror}")
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
            help=f"Preset ({_PRESETS}); overrides --early-exit-threshold.",
            envvar="OCTOMIL_SPEED_QUALITY",
        ),
    ] = None,
    host: Annotated[str, typer.Option(help="Interface to listen on.", envvar="OCTOMIL_HOST")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(help="TCP port.", envvar="OCTOMIL_PORT")] = 8080,
    api_key: Annotated[
        str | None,
        typer.Option(
            help="Require 'Authorization: Bearer KEY' on /v1/*.", envvar="OCTOMIL_API_KEY"
        ),
    ] = None,
    max_concurrency: Annotated[
        int,
        typer.Option(
            help="Requests waiting or running at once; more get HTTP 429.",
            envvar="OCTOMIL_MAX_CONCURRENCY",
        ),
    ] = 8,
    max_running: Annotated[
        int, typer.Option(help="Generations stepped in turn on the engine thread.")
    ] = 4,
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
    dtype: Annotated[str, typer.Option(help="Weight dtype: auto, float32, float16, ...")] = "auto",
    exit_policy: Annotated[
        str | None,
        typer.Option(
            help="Exit policy: a calibrated policy directory, 'lens' (raw shared head) or 'none' "
            "(default: the calibrated policy found for the model).",
            envvar="OCTOMIL_EXIT_POLICY",
        ),
    ] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
) -> None:
    """Serve the OpenAI-compatible API (chat, completions, models, metrics)."""
    try:
        settings = resolve_early_exit(preset=speed_quality, threshold=early_exit_threshold)
    except ConfigError as exc:
        _fail(str(exc))
    if not 0 < port < 65536:
        _fail(f"--port must be within 1..65535, got {port}")
    if max_concurrency < 1 or max_running < 1 or default_max_tokens < 1:
        _fail("--max-concurrency, --max-running and --default-max-tokens must be >= 1")
    sock = _bind(host, port)
    try:
        _run(
            model,
            settings,
            sock,
            host,
            port,
            api_key,
            max_concurrency,
            max_running,
            default_max_tokens,
            telemetry_headers,
            dtype,
            exit_policy,
            log_level,
        )
    finally:
        sock.close()


def _run(
    model: str | None,
    settings: EarlyExitSettings,
    sock: socket.socket,
    host: str,
    port: int,
    api_key: str | None,
    max_concurrency: int,
    max_running: int,
    default_max_tokens: int,
    telemetry_headers: bool,
    dtype: str,
    exit_policy: str | None,
    log_level: str,
) -> None:
    import uvicorn

    from octomil.engine.engine import Engine
    from octomil.server.app import create_app
    from octomil.server.engine_client import EngineClient
    from octomil.server.serving import ServeOptions

    client = EngineClient(
        lambda: Engine.load(model, dtype=dtype, early_exit=settings, exit_policy=exit_policy),
        max_concurrency=max_concurrency,
        max_running=max_running,
    )
    try:
        engine = client.wait_loaded()
    except KeyboardInterrupt:
        client.close(timeout=0)
        raise typer.Exit(130) from None
    except ValueError as exc:  # ModelNotAvailableError and bad dtype: one user-facing line
        client.close()
        _fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__, code=1)
    print(f"[engine] Selected: {engine.selection}", flush=True)
    print(f"[early-exit] {engine.effective_early_exit.describe()}", flush=True)
    print(f"[serve] Listening on http://{host}:{port}", flush=True)
    if settings.enabled:
        print(f"[early-exit] Policy: {engine.exit_choice.status}", flush=True)
    options = ServeOptions(
        api_key=api_key,
        max_concurrency=max_concurrency,
        max_running=max_running,
        telemetry_headers=telemetry_headers,
        default_max_tokens=default_max_tokens,
    )
    app = create_app(client, options=options)
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])


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
