"""What ``make setup`` and the Docker image install: package data and a warning-free build."""

from pathlib import Path

import pytest

from octomil.calibrate.prompts import eval_prompts_path

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[2]


def test_license_is_an_spdx_string_built_by_a_setuptools_that_reads_it() -> None:
    """Regression: a license table made every setup print setuptools deprecation warnings."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["license"] == "Apache-2.0"
    assert "setuptools>=77" in project["build-system"]["requires"]


def test_eval_prompts_ship_as_package_data() -> None:
    """Regression: `octomil eval` defaulted to benchmarks/..., missing outside the repository."""
    path = eval_prompts_path()
    assert path.is_file() and path.parent == ROOT / "src" / "octomil" / "calibrate"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = project["tool"]["setuptools"]["package-data"]["octomil"]
    assert any(path.relative_to(ROOT / "src" / "octomil").match(p) for p in patterns)
    assert len(path.read_text().splitlines()) == 32
