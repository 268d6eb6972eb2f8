"""Run Python code in a fresh interpreter: what happens at ``import octomil`` depends on the
process (libraries loaded before mlx, environment variables), so such tests need their own."""

import os
import subprocess
import sys


def run_python(code: str, env: dict[str, str] | None = None) -> list[str]:
    """The stdout lines of ``python -c code`` with ``env`` added to this environment."""
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip().splitlines()
