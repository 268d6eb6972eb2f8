"""Ray Serve application builder: the ``octomil serve --ray`` deployment for ``serve run`` and
KubeRay's ``RayService`` (``import_path: octomil.server.ray_app:build_app``).

Its ``args`` are ``octomil serve``'s flags, spelled with underscores (``replicas``,
``max_replicas``, ``speed_quality``, ``metrics_port``, ...): they are parsed by the CLI's own
command, so defaults, environment variables (``OCTOMIL_API_KEY``) and checks are the same.

    serve run octomil.server.ray_app:build_app replicas=2 max_replicas=4
"""

from __future__ import annotations

from typing import Any

import typer
from ray import serve

from octomil.config import ConfigError
from octomil.server.ray_cli import RayFlags, plan
from octomil.server.ray_deployment import build
from octomil.server.serve_flags import serve_flags

_RAY_ONLY = ("replicas", "min_replicas", "max_replicas", "replica_cpus", "metrics_port")


def build_app(args: dict[str, Any]) -> serve.Application:
    from octomil.cli import app

    argv: list[str] = []
    for key, value in args.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + key.replace("_", "-"))
        else:
            argv += [flag, str(value)]
    command = typer.main.get_command(app).commands["serve"]  # type: ignore[attr-defined]
    params = command.make_context("serve", argv).params
    flags = serve_flags(params)
    ray_flags = RayFlags(*(params[n] for n in _RAY_ONLY))
    for checked in (flags, ray_flags):
        try:
            checked.check()
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
    return build(*plan(flags, ray_flags))
