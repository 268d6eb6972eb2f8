"""Smoke run of the serving benchmark (benchmarks/serve_bench.py) against a real `octomil serve`.

Starts the real server on the embedded model and two tiny load levels over real HTTP, then checks
the JSON's shape. ~30 s, so it runs only when asked: OCTOMIL_BENCH_SMOKE=1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not os.environ.get("OCTOMIL_BENCH_SMOKE"), reason="set OCTOMIL_BENCH_SMOKE=1 to run"
    ),
]


def test_quick_run_against_octomil_writes_every_level(tmp_path: Path) -> None:
    out = tmp_path / "serve.json"
    argv = [sys.executable, str(ROOT / "benchmarks" / "serve_bench.py"), "--quick"]
    argv += ["--config", "octomil", "--levels", "1,2", "--requests", "2", "--max-tokens", "4"]
    argv += ["--seconds", "40", "--out", str(out)]
    subprocess.run(argv, check=True, timeout=180, cwd=ROOT)

    result = json.loads(out.read_text())
    assert result["smoke"] is True
    assert result["settings"]["levels"] == [1, 2]
    assert set(result["machine"]) >= {"cpu_model", "load_average_1m", "git_commit", "command"}
    (config,) = result["configs"]
    assert (config["name"], config["kind"], config["available"]) == ("octomil", "octomil", True)
    assert [lv["concurrency"] for lv in config["levels"]] == [1, 2]
    for level in config["levels"]:
        assert (level["requests"], level["completed"], level["errors"]) == (2, 2, 0)
        assert level["usage_reported"] is True
        assert 0 < level["output_tokens"] <= 2 * 4
        assert set(level["ttft_s"]) == set(level["itl_s"]) == {"p50", "p95", "p99"}
        # Early exit is off by default: every token runs all 30 layers of the embedded model.
        assert (level["avg_layers_per_token"], level["total_layers"]) == (30.0, 30)
    assert "server" in config["levels"][0] and "server" not in config["levels"][1]
    assert out.with_suffix(".png").stat().st_size > 0
