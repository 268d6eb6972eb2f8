"""Command line: ``octomil generate`` (one-shot); ``serve``, ``models``, ``calibrate``, ``eval``
register themselves from their subsystems.

Heavy imports (mlx, the engine) happen inside commands so ``--help`` and ``--version`` are instant.
User errors end with one ``error:`` line on stderr and exit status 2, never a traceback
(:mod:`octomil.cli_common`); flags are checked before the model loads.
"""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer

from octomil import __version__
from octomil.cli_common import TYPER_SETTINGS, check_dtype, check_exit_policy, check_model, fail
from octomil.config import ConfigError, SpeedQuality, resolve_early_exit

app = typer.Typer(
    name="octomil",
    help="OpenAI-compatible LLM server on MLX with entropy-based early exit.",
    no_args_is_help=True,
    add_completion=False,
    **TYPER_SETTINGS,
)

ModelArg = Annotated[
    str | None,
    typer.Option(
        "--model", "-m", help="Alias, local model dir / .gguf, or HF repo id (default: embedded)"
    ),
]
PresetOpt = Annotated[
    SpeedQuality | None,
    typer.Option("--speed-quality", help="Early-exit preset; overrides --early-exit-threshold"),
]
ThresholdOpt = Annotated[
    float | None,
    typer.Option("--early-exit-threshold", help="Exit when entropy (nats) <= T, T in [0, 1]"),
]
ExitLayersOpt = Annotated[
    str | None,
    typer.Option(
        "--exit-layers",
        help="Comma-separated depths (1-based) where exits are checked, e.g. 15,22,29 "
        "(default: 3 points "
        "from the minimum depth to the penultimate layer)",
    ),
]
DtypeOpt = Annotated[
    str,
    typer.Option(
        "--dtype",
        help="Weight layout: auto (the faster exact one: the checkpoint's own precision or "
        "float32), native, float32, bfloat16, float16, q8, q4 (8/4-bit weights on Octomil's CPU "
        "kernel)",
    ),
]


def parse_exit_layers(text: str | None) -> tuple[int, ...] | None:
    """``"15,22,29"`` -> ``(15, 22, 29)``; None stays None (engine default)."""
    if text is None:
        return None
    try:
        layers = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ConfigError(f"--exit-layers must be comma-separated integers, got {text!r}") from None
    if not layers or min(layers) < 1:
        raise ConfigError(f"--exit-layers must list depths >= 1, got {text!r}")
    return layers


def _version(value: bool) -> None:
    if value:
        typer.echo(f"octomil {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version")
    ] = False,
) -> None:
    """Octomil command line."""


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="User message (the chat template is applied)")],
    model: ModelArg = None,
    speed_quality: PresetOpt = None,
    early_exit_threshold: ThresholdOpt = None,
    exit_layers: ExitLayersOpt = None,
    max_tokens: Annotated[
        int, typer.Option("--max-tokens", min=1, help="Tokens to generate")
    ] = 256,
    temperature: Annotated[float, typer.Option(min=0.0, max=2.0, help="0 = greedy")] = 0.0,
    seed: Annotated[int | None, typer.Option(help="Sampling seed")] = None,
    dtype: DtypeOpt = "auto",
    exit_policy: Annotated[
        str | None,
        typer.Option(
            help="Exit policy: a calibrated policy directory, 'lens' (raw shared head) or 'none' "
            "(default: the calibrated policy found for the model)",
            envvar="OCTOMIL_EXIT_POLICY",
        ),
    ] = None,
    raw: Annotated[bool, typer.Option("--raw", help="Do not apply the chat template")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object")] = False,
) -> None:
    """Generate one answer and print it with its early-exit statistics."""
    try:
        settings = resolve_early_exit(speed_quality, early_exit_threshold)
        layers = parse_exit_layers(exit_layers)
        if layers is not None and not settings.enabled:
            raise ConfigError(
                "--exit-layers needs --early-exit-threshold or --speed-quality "
                "(without one, decoding is full depth and no layer is checked)"
            )
        check_dtype(dtype)
        check_model(model)
        check_exit_policy(exit_policy)
    except ConfigError as exc:
        fail(str(exc))
    from octomil.engine.engine import Engine
    from octomil.engine.errors import EngineInputError
    from octomil.engine.types import GenerationRequest, SamplingParams

    try:
        engine = Engine.load(
            model, dtype=dtype, early_exit=settings, exit_layers=layers, exit_policy=exit_policy
        )
    except ValueError as exc:  # ModelNotAvailableError, ExitPolicyError: found while loading
        fail(str(exc))
    try:
        ids = (
            engine.encode(prompt)
            if raw
            else engine.encode_chat([{"role": "user", "content": prompt}])
        )
        gen = engine.generate(
            GenerationRequest(
                tuple(ids),
                SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed),
            )
        )
    except EngineInputError as exc:
        fail(str(exc))
    if not as_json:
        typer.echo(f"[engine] Selected: {engine.selection}", err=True)
        typer.echo(f"[early-exit] {engine.effective_early_exit.describe()}", err=True)
        if settings.enabled:
            typer.echo(f"[early-exit] Policy: {engine.exit_choice.status}", err=True)
    pieces = []
    for event in gen:
        pieces.append(event.text)
        if not as_json:
            sys.stdout.write(event.text)
            sys.stdout.flush()
    s = gen.stats
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "text": "".join(pieces),
                    "early_exit_tokens": s.early_exit_tokens,
                    "avg_layers_used": round(s.avg_layers_used, 3),
                    "total_layers": s.total_layers,
                    "completion_tokens": s.completion_tokens,
                    "decode_tokens_per_s": round(s.decode_tokens_per_s, 2),
                    "prompt_tokens": s.prompt_tokens,
                    "time_to_first_token_s": round(s.time_to_first_token_s, 4),
                    "finish_reason": s.finish_reason,
                }
            )
        )
        return
    typer.echo("")
    typer.echo(
        f"--\ntokens: {s.completion_tokens} ({s.finish_reason}) | early-exit tokens: "
        f"{s.early_exit_tokens} ({s.exit_percentage:.1f}%) | avg layers used: "
        f"{s.avg_layers_used:.1f}/{s.total_layers} | TTFT: {s.time_to_first_token_s:.2f} s | "
        f"decode: {s.decode_tokens_per_s:.1f} tok/s"
    )


def _register_commands() -> None:
    """Commands living beside their subsystem (server, calibration), each with ``register(app)``."""
    import importlib

    for module in ("octomil.server.cli_serve", "octomil.calibrate.cli_calibrate"):
        try:
            importlib.import_module(module).register(app)
        except ModuleNotFoundError as exc:
            if exc.name is None or not module.startswith(exc.name):
                raise


_register_commands()


def main() -> None:
    """The ``octomil`` console command."""
    from octomil.cli_common import run

    run(app)


if __name__ == "__main__":
    main()
