"""``octomil calibrate`` (train an exit policy for a model) and ``octomil eval`` (measure one)."""

from __future__ import annotations

import contextlib
import json
import shlex
import sys
from collections.abc import Callable, Iterator
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from octomil.cli_common import check_dtype, check_exit_policy, check_model, fail
from octomil.config import ConfigError, SpeedQuality, resolve_early_exit

ModelArg = Annotated[
    str | None,
    typer.Argument(help="Alias, local model dir / .gguf, or HF repo id (default: embedded)"),
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


class Method(str, Enum):
    """A decision method's calibrated placement: the fastest one within the preset's budget
    (what serving uses when it is the policy's choice), or the one using the fewest layers."""

    entropy = "entropy"
    probe = "probe"
    lowrank = "lowrank"
    entropy_fewest = "entropy-fewest-layers"
    probe_fewest = "probe-fewest-layers"
    lowrank_fewest = "lowrank-fewest-layers"


def _parse_layers(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        layers = tuple(sorted({int(x) for x in text.replace(" ", "").split(",") if x}))
    except ValueError:
        fail(f"--layers must be comma-separated depths such as 8,12,15, got {text!r}")
    if not layers:
        fail("--layers is empty")
    return layers


@contextlib.contextmanager
def _progress(label: str, total: int) -> Iterator[Callable[[int], None]]:
    with typer.progressbar(
        length=max(total, 1), label=f"[calibrate] {label:<26}", file=sys.stderr
    ) as bar:
        done = 0

        def tick(n: int) -> None:
            nonlocal done
            n = min(n, total - done)  # a token budget may be overshot by the last batch
            if n > 0:
                done += n
                bar.update(n)

        yield tick
        if done < total:
            bar.update(total - done)


def _check(model: str | None, dtype: str, exit_policy: str | None = None) -> None:
    """The flags every command here shares, checked before anything loads."""
    try:
        check_dtype(dtype)
        check_model(model)
        check_exit_policy(exit_policy)
    except ConfigError as exc:
        fail(str(exc))


def _load(model: str | None, dtype: str, exit_policy: str | None = None):
    from octomil.engine.engine import Engine

    try:
        return Engine.load(model, dtype=dtype, exit_policy=exit_policy)
    except ValueError as exc:  # ModelNotAvailableError, ExitPolicyError: found while loading
        fail(str(exc) or type(exc).__name__)


def calibrate(
    model: ModelArg = None,
    layers: Annotated[
        str | None,
        typer.Option(
            "--layers", help="Candidate exit depths, e.g. 8,12,15 (default: 25%..90% of the stack)"
        ),
    ] = None,
    tokens: Annotated[
        int, typer.Option("--tokens", min=500, help="Self-distillation tokens to generate")
    ] = 14000,
    seed: Annotated[int, typer.Option("--seed", help="Seed: prompt split, sampling, training")] = 0,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", help="Policy directory (default: the user cache, found automatically)"
        ),
    ] = None,
    steps: Annotated[
        int, typer.Option("--steps", min=0, help="KL fine-tuning steps (128 tokens each)")
    ] = 50,
    max_new_tokens: Annotated[
        int, typer.Option("--max-new-tokens", min=16, help="Longest continuation")
    ] = 128,
    retime: Annotated[
        bool,
        typer.Option(
            "--retime",
            help="Keep the trained adapters (of --out or the found policy); re-measure costs on "
            "this machine and re-place each preset's checks",
        ),
    ] = False,
    dtype: Annotated[
        str,
        typer.Option(
            "--dtype", help="Weight layout for training data (default float32: exact, reproducible)"
        ),
    ] = "float32",
) -> None:
    """Train exit adapters and gates for a model; calibrate where each preset checks for exits."""
    parsed = _parse_layers(layers)
    _check(model, dtype)
    from octomil.calibrate.pipeline import CalibrationConfig, save_replay
    from octomil.calibrate.pipeline import calibrate as run
    from octomil.engine.policy_store import user_policy_dir

    engine = _load(model, dtype, exit_policy="none")
    if engine.loaded.anatomy is None:
        fail(f"early exit is not supported for model family {engine.loaded.family!r}")
    target = out or user_policy_dir(engine.model_id)
    command = (
        "octomil calibrate " + shlex.join(sys.argv[2:]) if sys.argv[1:2] == ["calibrate"] else ""
    )
    config = CalibrationConfig(
        layers=parsed,
        tokens=tokens,
        seed=seed,
        steps=steps,
        max_new_tokens=max_new_tokens,
        command=command,
    )
    typer.echo(
        f"[calibrate] {engine.model_id}: {engine.total_layers} layers, {engine.selection}", err=True
    )
    if retime:
        _retime(engine, out, config.timing_repeats)
        return
    try:
        bundle = run(
            engine.loaded,
            engine.encode_chat,
            config,
            progress=_progress,
            say=lambda s: typer.echo(f"[calibrate] {s}", err=True),
        )
    except ValueError as exc:
        fail(str(exc))
    bundle.save(target)
    save_replay(target, bundle.replay, bundle.timing_prompt)
    secs = bundle.manifest.calibration.get("wall_clock_s", {}).get("total_s", 0)
    typer.echo(f"[calibrate] wrote {target} in {secs:.0f} s", err=True)
    typer.echo(str(target))


def _retime(engine, out: Path | None, repeats: int) -> None:
    """Re-place checks for this machine; a found (e.g. packaged) policy is written to the user
    cache, which takes precedence over it."""
    from octomil.calibrate.pipeline import retime, save_replay
    from octomil.engine.exit_adapters import ExitPolicyBundle, resolve_exit_policy
    from octomil.engine.policy_store import ExitPolicyError, user_policy_dir, weights_hash

    hidden = int(engine.loaded.model.args.hidden_size)
    source = engine.loaded.source
    try:
        if out is not None:
            bundle = ExitPolicyBundle.load(out)
            bundle.check_compatible(
                engine.model_id, weights_hash(source), engine.total_layers, hidden
            )
        else:
            choice = resolve_exit_policy(engine.model_id, source, engine.total_layers, hidden, None)
            if choice.bundle is None:
                fail(f"no exit policy found for {engine.model_id}: run `octomil calibrate` first")
            bundle = choice.bundle
        say = lambda s: typer.echo(f"[calibrate] {s}", err=True)  # noqa: E731
        new = retime(engine.loaded, bundle, bundle.path, repeats, _progress, say)
    except (ExitPolicyError, ValueError) as exc:
        fail(str(exc))
    target = out or user_policy_dir(engine.model_id)
    new.save(target)
    save_replay(target, new.replay, new.timing_prompt)
    typer.echo(str(target))


def eval_command(
    model: ModelArg = None,
    prompts: Annotated[
        Path | None,
        typer.Option(
            "--prompts",
            help='JSONL file, one {"prompt": ..., "category": ...} per line (default: the '
            "held-out prompts shipped with Octomil)",
        ),
    ] = None,
    speed_quality: Annotated[
        SpeedQuality | None,
        typer.Option("--speed-quality", help="Preset (default: balanced); overrides a threshold"),
    ] = None,
    early_exit_threshold: Annotated[
        float | None,
        typer.Option("--early-exit-threshold", help="Exit when entropy (nats) <= T, T in [0, 1]"),
    ] = None,
    method: Annotated[
        Method | None,
        typer.Option("--method", help="Exit decision method (default: the policy's choice)"),
    ] = None,
    exit_policy: Annotated[
        str | None,
        typer.Option("--exit-policy", help="Policy dir, 'lens' (raw shared head) or 'none'"),
    ] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", min=2, help="Tokens per prompt")] = 64,
    limit: Annotated[
        int | None, typer.Option("--limit", min=1, help="Only the first N prompts")
    ] = None,
    dtype: DtypeOpt = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object")] = False,
    speculative: Annotated[
        str | None,
        typer.Option(
            "--speculative",
            help="Measure speculative decoding (lookup, auto) against no speculation instead",
        ),
    ] = None,
    num_speculative_tokens: Annotated[
        int, typer.Option("--num-speculative-tokens", help="Most drafted tokens per step")
    ] = 8,
) -> None:
    """Agreement with full depth (teacher-forced), exact match, layers and speed, per category;
    with ``--speculative``: exact match, acceptance and speed of speculative decoding."""
    if speculative is not None and speculative != "off":
        _eval_speculative(
            model, prompts, speculative, num_speculative_tokens, max_tokens, limit, dtype, as_json
        )
        return
    try:
        if speed_quality is None and early_exit_threshold is None:
            speed_quality = SpeedQuality.balanced
        settings = resolve_early_exit(speed_quality, early_exit_threshold)
    except ConfigError as exc:
        fail(str(exc))
    from octomil.calibrate.evaluate import PromptFileError, evaluate, load_prompts
    from octomil.calibrate.prompts import eval_prompts_path
    from octomil.engine.policy_store import ExitPolicyError

    try:
        rows = load_prompts(prompts or eval_prompts_path(), limit)
    except PromptFileError as exc:
        fail(str(exc))
    _check(model, dtype, exit_policy)
    engine = _load(model, dtype, exit_policy)
    if engine.loaded.anatomy is None:
        fail(f"early exit is not supported for model family {engine.loaded.family!r}")
    try:
        policy = engine.policy_for(settings, method=method.value if method else None)
    except ExitPolicyError as exc:
        fail(str(exc))
    where = "none (full depth)" if policy is None else ",".join(map(str, policy.exit_layers))
    how = getattr(policy, "method", "lens") if policy is not None else "-"
    if not as_json:
        typer.echo(f"[engine] Selected: {engine.selection}", err=True)
        typer.echo(f"[early-exit] {settings.describe()} | {engine.exit_choice.status}", err=True)
        typer.echo(
            f"[eval] {len(rows)} prompts, {max_tokens} tokens, method {how}, checks at {where}",
            err=True,
        )

    def on_prompt(i: int, r) -> None:
        if not as_json:
            typer.echo(
                f"[eval] {i + 1}/{len(rows)} {r.category}: agreement {r.agree}/{r.positions}, "
                f"exact {'yes' if r.exact else 'no'}",
                err=True,
            )

    summary = evaluate(engine, rows, policy, max_tokens, on_prompt)
    summary = {
        "model": engine.model_id,
        "setting": settings.preset.value
        if settings.preset
        else f"threshold={settings.threshold:g}",
        "method": how,
        "exit_layers": list(policy.exit_layers) if policy is not None else [],
        "exit_policy": engine.exit_choice.status,
        **summary,
    }
    if as_json:
        typer.echo(json.dumps(summary))
        return
    _print_table(summary)


def _eval_speculative(
    model: str | None,
    prompts: Path | None,
    mode: str,
    num_tokens: int,
    max_tokens: int,
    limit: int | None,
    dtype: str,
    as_json: bool,
) -> None:
    from octomil.cli_speculative import check_speculative

    try:
        check_speculative(mode, num_tokens)
    except ConfigError as exc:
        fail(str(exc))
    from octomil.calibrate.eval_speculative import evaluate_speculative
    from octomil.calibrate.evaluate import PromptFileError, load_prompts
    from octomil.calibrate.prompts import eval_prompts_path
    from octomil.engine.speculation import SpeculativeSettings

    try:
        rows = load_prompts(prompts or eval_prompts_path(), limit)
    except PromptFileError as exc:
        fail(str(exc))
    _check(model, dtype, None)
    engine = _load(model, dtype, "none")
    settings = SpeculativeSettings(mode, num_tokens)
    if settings.draft_model is not None:
        try:
            engine.load_draft_model(settings.draft_model, dtype)
        except ValueError as exc:  # DraftModelError, ModelNotAvailableError
            fail(str(exc))
    if not as_json:
        typer.echo(f"[engine] Selected: {engine.selection}", err=True)
        typer.echo(f"[speculative] {settings.describe()}", err=True)

    def on_prompt(i: int, r) -> None:
        if not as_json:
            s = r.spec.spec
            typer.echo(
                f"[eval] {i + 1}/{len(rows)} {r.category}: exact "
                f"{'yes' if r.plain.tokens == r.spec.tokens else 'no'}, accepted "
                f"{s.accepted_tokens if s else 0}/{s.draft_tokens if s else 0}",
                err=True,
            )

    summary = {"model": engine.model_id}
    summary |= evaluate_speculative(engine, rows, settings, max_tokens, on_prompt)
    if as_json:
        typer.echo(json.dumps(summary))
        return
    typer.echo(
        f"{'category':<12} {'prompts':>7} {'exact':>6} {'agree':>7} {'accept':>7} "
        f"{'tok/step':>8} {'tok/s':>7} {'plain':>7} {'speedup':>8}"
    )
    for name, r in [*summary["per_category"].items(), ("all", summary)]:
        typer.echo(
            f"{name:<12} {r['prompts']:>7} {r['exact_match']:>6.0%} {r['token_agreement']:>7.2%} "
            f"{r['acceptance_rate']:>7.2%} {r['mean_accepted_per_step']:>8.2f} "
            f"{r['decode_tokens_per_s']:>7.2f} {r['decode_tokens_per_s_full_depth']:>7.2f} "
            f"{r['speedup_vs_full_depth']:>7.3f}x"
        )


def _print_table(s: dict) -> None:
    head = (
        f"{'category':<12} {'prompts':>7} {'agree':>7} {'exact':>6} {'layers':>7} {'exits':>6} "
        f"{'tok/s':>7} {'full':>7} {'speedup':>8}"
    )
    typer.echo(head)
    rows = [*s["per_category"].items(), ("all", s)]
    for name, r in rows:
        typer.echo(
            f"{name:<12} {r['prompts']:>7} {r['token_agreement']:>7.2%} {r['exact_match']:>6.0%} "
            f"{r['avg_layers_used']:>7.2f} {r['early_exit_share']:>6.1%} "
            f"{r['decode_tokens_per_s']:>7.2f} "
            f"{r['decode_tokens_per_s_full_depth']:>7.2f} {r['speedup_vs_full_depth']:>7.3f}x"
        )
    typer.echo(
        f"total layers: {s['total_layers']}; agreement is teacher-forced on the full-depth output"
    )


def register(app: typer.Typer) -> None:
    app.command("calibrate")(calibrate)
    app.command("eval")(eval_command)
