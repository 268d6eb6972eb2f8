"""The committed exit policy of the embedded model loads, and ``octomil eval --json`` runs on it."""

import json
import os
import subprocess
import sys

import pytest

from octomil.config import resolve_early_exit
from octomil.engine.engine import Engine
from octomil.engine.exit_adapters import AdaptedExitPolicy
from octomil.engine.policy_store import packaged_policy_dir, weights_hash

pytestmark = pytest.mark.slow


def test_committed_policy_matches_the_embedded_weights(monkeypatch, tmp_path):
    monkeypatch.setenv("OCTOMIL_CACHE", str(tmp_path))  # no user policy: the packaged one is found
    monkeypatch.delenv("OCTOMIL_EXIT_POLICY", raising=False)
    engine = Engine.load()
    bundle = engine.exit_bundle
    assert bundle is not None and bundle.path == packaged_policy_dir("smollm2-135m")
    assert bundle.manifest.weights_sha256 == weights_hash(engine.loaded.source)
    assert set(bundle.manifest.presets) == {"quality", "balanced", "fast"}
    for preset in ("quality", "balanced", "fast"):
        policy = engine.policy_for(resolve_early_exit(preset))
        assert policy is None or isinstance(policy, AdaptedExitPolicy)


def test_eval_json_on_two_prompts(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "octomil.cli",
            "eval",
            "--json",
            "--limit",
            "2",
            "--max-tokens",
            "8",
            "--speed-quality",
            "balanced",
            "--method",
            "probe-fewest-layers",  # a placement that exits (the served one may check nowhere)
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OCTOMIL_CACHE": str(tmp_path)},
        cwd=tmp_path,  # regression: the default prompts path was relative to the repository
    )
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert {
        "token_agreement",
        "exact_match",
        "avg_layers_used",
        "total_layers",
        "speedup_vs_full_depth",
        "per_category",
    } <= set(data)
    assert data["method"] == "probe" and data["exit_layers"]
    assert data["total_layers"] == 30 and data["prompts"] == 2 and 0 <= data["token_agreement"] <= 1
