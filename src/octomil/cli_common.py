"""What every ``octomil`` command shares: one way to fail, and the checks run before loading.

The convention: a user error ends a command with one ``error: ...`` line on stderr and exit
status 2, never a traceback or a boxed message, and every flag that can be checked without the
model is checked before the model (or MLX) is loaded. Click's own usage errors (an unknown
option, a value out of a declared range) are turned into the same line by :func:`run`, the
console entry point. Help is plain text, wrapped to the terminal (120 columns when piped).

Nothing heavy is imported here: ``--help`` stays instant.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import NoReturn

import typer

from octomil.config import WEIGHT_LAYOUTS, ConfigError

USAGE_ERROR = 2
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")  # uvicorn's
HELP_WIDTH = 120

# The click Typer runs on (a vendored copy in recent Typer, the click package before), found from
# an exception Typer exports rather than imported by name.
_ClickException = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
_NoArgsIsHelp = getattr(sys.modules[_ClickException.__module__], "NoArgsIsHelpError", ())

# Typer settings shared by the app: plain help (rich cuts long option names and help at 80
# columns when piped), wide enough not to wrap every option.
TYPER_SETTINGS = {
    "rich_markup_mode": None,
    "pretty_exceptions_enable": False,
    "context_settings": {
        "max_content_width": HELP_WIDTH,
        "terminal_width": shutil.get_terminal_size((HELP_WIDTH, 24)).columns,
    },
}


def fail(message: str) -> NoReturn:
    """One ``error:`` line (the first line of ``message``) and exit status 2."""
    first = message.strip().splitlines()[0] if message.strip() else "invalid usage"
    typer.echo(f"error: {first}", err=True)
    raise typer.Exit(USAGE_ERROR)


def check_log_level(level: str) -> str:
    if level.lower() not in LOG_LEVELS:
        raise ConfigError(f"--log-level must be one of {', '.join(LOG_LEVELS)}, got {level!r}")
    return level.lower()


def check_dtype(dtype: str) -> str:
    if dtype not in WEIGHT_LAYOUTS:
        raise ConfigError(f"--dtype must be one of {', '.join(WEIGHT_LAYOUTS)}, got {dtype!r}")
    return dtype


def check_model(name: str | None) -> None:
    """The model resolves (alias, local path, hub id) and an embedded one is installed; a hub
    model that is not cached is only known to fail when the download is tried."""
    from octomil.models import registry
    from octomil.models.errors import ModelNotAvailableError

    try:
        spec = registry.resolve(name)
        if spec.is_embedded:
            registry.embedded_file(spec)
    except ModelNotAvailableError as exc:
        raise ConfigError(str(exc)) from None


def check_exit_policy(value: str | None) -> None:
    """``--exit-policy`` is lens, none, or a directory holding a policy (whether it fits the
    model's weights is checked once they are loaded)."""
    from octomil.engine.policy_store import LENS, NONE, WEIGHTS, ExitPolicyError, read_manifest

    if value is None or value in (LENS, NONE):
        return
    path = Path(value).expanduser()
    if not path.is_dir():
        raise ConfigError(
            f"--exit-policy {value!r} is not a directory (nor 'lens' or 'none'); calibrated "
            "policies are made by `octomil calibrate`"
        )
    try:
        read_manifest(path)
    except ExitPolicyError as exc:
        raise ConfigError(f"--exit-policy: {exc}") from None
    if not (path / WEIGHTS).is_file():
        raise ConfigError(f"--exit-policy: {path} has no {WEIGHTS}")


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:] if text[1:2].islower() else text


def run(app: typer.Typer, args: list[str] | None = None) -> NoReturn:
    """Run ``app`` as the console command, with click's usage errors as one ``error:`` line."""
    command = typer.main.get_command(app)
    try:
        code = command.main(args=args, prog_name="octomil", standalone_mode=False)
    except _NoArgsIsHelp as exc:
        typer.echo(exc.format_message())  # the help text, as asked for by no arguments
        raise SystemExit(USAGE_ERROR) from None
    except _ClickException as exc:
        where = f" (see `{exc.ctx.command_path} --help`)" if getattr(exc, "ctx", None) else ""
        typer.echo(f"error: {_lower_first(exc.format_message())}{where}", err=True)
        raise SystemExit(USAGE_ERROR) from None
    except typer.Abort:
        typer.echo("", err=True)
        raise SystemExit(130) from None
    raise SystemExit(code if isinstance(code, int) else 0)
