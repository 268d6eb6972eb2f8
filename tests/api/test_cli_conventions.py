"""One CLI convention: every bad flag is found before anything loads and ends the command with
one ``error: ...`` line on stderr and exit status 2 (never a traceback, a boxed message or exit 1);
help is not cut at 80 columns; serving others without a key warns loudly."""

from __future__ import annotations

import json
import socket
import subprocess

import pytest
from conftest import free_port, octomil_cmd

from octomil.server.cli_serve import exposure_warning


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        octomil_cmd(*args),
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
    )


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        # Regression: printed "Listening" and then a 44-line traceback.
        (("serve", "--log-level", "loud"), "--log-level"),
        # Regression: these three exited 1 (after loading) while other bad flags exited 2.
        (("serve", "--dtype", "float8"), "--dtype"),
        (("serve", "no-such-model-xyz"), "unknown model 'no-such-model-xyz'"),
        (("serve", "--exit-policy", "/no/such/policy"), "--exit-policy"),
        (("serve", "--max-running", "0"), "--max-running"),
        (("serve", "--port", "abc"), "--port"),
        (("serve", "--heap-trim-interval", "-1"), "--heap-trim-interval"),
        (("serve", "--no-such-flag"), "no such option"),
        # Regression: generate printed click's boxed error where serve printed one line.
        (("generate", "hi", "--temperature", "5"), "--temperature"),
        (("generate", "hi", "--max-tokens", "0"), "--max-tokens"),
        (("generate",), "missing argument"),
        (("generate", "hi", "--dtype", "float8"), "--dtype"),
        (("generate", "hi", "--model", "no-such-model-xyz"), "unknown model"),
        (("generate", "hi", "--exit-policy", "/no/such/policy"), "--exit-policy"),
        # Regression: --exit-layers without a threshold or preset was silently ignored.
        (("generate", "hi", "--exit-layers", "15"), "--exit-layers needs"),
        (("eval", "--dtype", "float8"), "--dtype"),
        (("eval", "--prompts", "/no/such.jsonl"), "/no/such.jsonl"),
        (("calibrate", "--dtype", "float8"), "--dtype"),
        (("calibrate", "--layers", "x"), "--layers"),
        (("no-such-command",), "no such command"),
    ],
)
def test_bad_flags_are_one_line_exit_2_before_loading(args: tuple[str, ...], needle: str) -> None:
    proc = _run(*args)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert needle in lines[0]
    assert not set("╭│╰") & set(proc.stderr)  # no rich box
    # Before loading: no startup line anywhere (it goes to stdout for serve, stderr otherwise).
    assert "Listening" not in proc.stdout and "[engine]" not in proc.stdout + proc.stderr


def test_a_policy_for_other_weights_is_exit_2(tmp_path) -> None:
    """Found only once the weights are loaded (their hash), still one line and exit 2."""
    import shutil
    from importlib import resources

    policy = tmp_path / "policy"
    shutil.copytree(str(resources.files("octomil").joinpath("policies/smollm2-135m")), policy)
    manifest = json.loads((policy / "manifest.json").read_text())
    manifest["weights_sha256"] = "0" * 64
    (policy / "manifest.json").write_text(json.dumps(manifest))
    proc = _run("serve", "--port", str(free_port()), "--exit-policy", str(policy))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Listening" not in proc.stdout


@pytest.mark.parametrize("command", ["serve", "generate", "eval", "calibrate"])
def test_help_is_not_cut_at_80_columns(command: str) -> None:
    """Regression: piped help was cut at 80 columns ("--early-exit-thresh…")."""
    proc = _run(command, "--help")
    assert proc.returncode == 0, proc.stderr
    assert "…" not in proc.stdout and not set("╭│╰") & set(proc.stdout)
    assert max(len(line) for line in proc.stdout.splitlines()) > 80
    flags = {
        "serve": ["--early-exit-threshold", "--default-max-tokens", "--no-telemetry-headers"],
        "generate": ["--early-exit-threshold", "--exit-layers", "--exit-policy"],
        "eval": ["--early-exit-threshold", "--prompts", "--method"],
        "calibrate": ["--max-new-tokens", "--retime"],
    }[command]
    for flag in flags:
        assert flag in proc.stdout


@pytest.mark.parametrize(
    ("host", "key", "warns"),
    [
        ("127.0.0.1", None, False),
        ("0.0.0.0", None, True),
        ("0.0.0.0", "sk-key", False),
    ],
)
def test_reachable_without_a_key_warns(host: str, key: str | None, warns: bool) -> None:
    """Regression: binding 0.0.0.0 without --api-key was silent. (Bound, never listening.)"""
    with socket.socket() as sock:
        sock.bind((host, 0))
        warning = exposure_warning(sock, key)
    assert (warning is not None) == warns
    if warns:
        assert warning.startswith("[serve] WARNING: listening on 0.0.0.0 without an API key")
