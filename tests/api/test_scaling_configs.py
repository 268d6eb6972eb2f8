"""Replica configs: the Kubernetes manifests hang together and run the real CLI's flags, the
resource requests cover the measured resident memory, and the Grafana dashboard and Prometheus
config aggregate across replicas."""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path

import pytest
import typer
import yaml

from octomil.cli import app

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = ROOT / "deploy" / "k8s" / "octomil.yaml"
DASHBOARD = ROOT / "configs" / "grafana" / "octomil-dashboard.json"
MEASURED = ROOT / "benchmarks" / "results" / "ray.json"
_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30}


def mib(quantity: str) -> float:
    number, unit = re.fullmatch(r"(\d+)(Ki|Mi|Gi)", quantity).groups()  # type: ignore[union-attr]
    return int(number) * _UNITS[unit] / 2**20


@pytest.fixture(scope="module")
def docs() -> dict[str, dict]:
    loaded = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]
    by_kind = {d["kind"]: d for d in loaded}
    assert len(by_kind) == len(loaded)
    return by_kind


def test_manifest_kinds_and_names(docs: dict[str, dict]) -> None:
    assert set(docs) == {"Deployment", "Service", "HorizontalPodAutoscaler"}
    assert docs["Deployment"]["apiVersion"] == "apps/v1"
    assert docs["HorizontalPodAutoscaler"]["apiVersion"] == "autoscaling/v2"
    assert {d["metadata"]["name"] for d in docs.values()} == {"octomil"}


def test_service_and_hpa_point_at_the_deployment(docs: dict[str, dict]) -> None:
    deployment, service, hpa = (
        docs[k] for k in ("Deployment", "Service", "HorizontalPodAutoscaler")
    )
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert service["spec"]["selector"].items() <= pod_labels.items()
    ports = {p["name"] for p in deployment["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= ports
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    spec = hpa["spec"]
    assert spec["minReplicas"] <= deployment["spec"]["replicas"] <= spec["maxReplicas"]
    pods_metric = next(m for m in spec["metrics"] if m["type"] == "Pods")
    assert pods_metric["pods"]["metric"]["name"] == "octomil_requests_running"


def test_probes_and_scrape_annotations_use_the_server_port(docs: dict[str, dict]) -> None:
    template = docs["Deployment"]["spec"]["template"]
    container = template["spec"]["containers"][0]
    port = container["ports"][0]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert (get["path"], get["port"]) == ("/health", port["name"]), probe
    notes = template["metadata"]["annotations"]
    assert notes["prometheus.io/scrape"] == "true"
    assert notes["prometheus.io/path"] == "/metrics"
    assert int(notes["prometheus.io/port"]) == port["containerPort"]


def test_the_command_parses_with_the_real_cli(docs: dict[str, dict]) -> None:
    spec = docs["Deployment"]["spec"]["template"]["spec"]
    command = spec["containers"][0]["command"]
    assert command[:2] == ["octomil", "serve"]
    serve = typer.main.get_command(app).commands["serve"]  # type: ignore[attr-defined]
    params = serve.make_context("serve", list(command[2:])).params
    assert params["port"] == spec["containers"][0]["ports"][0]["containerPort"]
    assert params["host"] == "0.0.0.0"
    # The engine's default KV budget reads the node's memory, not the pod's limit.
    assert params["max_kv_tokens"] is not None
    assert spec["terminationGracePeriodSeconds"] > params["shutdown_timeout"]


def test_memory_request_covers_the_measured_replica(docs: dict[str, dict]) -> None:
    resources = docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]["resources"]
    summary = json.loads(MEASURED.read_text())["summary"]
    peak = max(config["replica_rss_mib_max"] for config in summary.values())
    assert mib(resources["requests"]["memory"]) >= peak
    assert mib(resources["limits"]["memory"]) >= mib(resources["requests"]["memory"])


def test_dashboard_sums_over_replicas_and_plots_each() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = {p["title"]: [t["expr"] for t in p["targets"]] for p in dashboard["panels"]}
    # Every query aggregates, so N scraped replicas show as one server ...
    for title, queries in exprs.items():
        for q in queries:
            assert re.match(r"(sum|max|count|histogram_quantile)\b", q), (title, q)
    # ... and the per-replica panels split by the instance label.
    assert exprs["Tokens per second by replica"][0].startswith("sum by (instance) (rate(")
    assert all(
        q.startswith("sum by (instance)") for q in exprs["Running and waiting requests by replica"]
    )


def test_prometheus_ray_config_lists_consecutive_replica_ports() -> None:
    prom = yaml.safe_load((ROOT / "configs" / "prometheus-ray.yml").read_text())
    job = prom["scrape_configs"][0]
    targets = job["static_configs"][0]["targets"]
    ports = [int(t.rsplit(":", 1)[1]) for t in targets]
    assert ports == list(range(ports[0], ports[0] + len(ports)))
    assert job["metrics_path"] == "/metrics"


RAYSERVICE = ROOT / "deploy" / "k8s" / "octomil-rayservice.yaml"


def test_rayservice_builds_its_application_with_the_real_builder() -> None:
    """The RayService's serveConfigV2 names an import path and args that build the deployment
    (the flags are parsed by the CLI's own command), with one replica per worker pod."""
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'octomil[ray]')")

    from octomil.server.ray_proxy_errors import IMPORT_PATH

    service = yaml.safe_load(RAYSERVICE.read_text())
    assert (service["apiVersion"], service["kind"]) == ("ray.io/v1", "RayService")
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    application = config["applications"][0]
    assert application["route_prefix"] == "/"
    module, name = application["import_path"].split(":")
    built = getattr(importlib.import_module(module), name)(application["args"])
    deployment = built._bound_deployment
    auto = deployment._deployment_config.autoscaling_config
    args = application["args"]
    assert (auto.min_replicas, auto.initial_replicas, auto.max_replicas) == (
        args["min_replicas"],
        args["replicas"],
        args["max_replicas"],
    )
    assert deployment.init_args[0].metrics_port == args["metrics_port"]

    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == ray.__version__
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    workers = cluster["workerGroupSpecs"][0]
    assert float(workers["rayStartParams"]["num-cpus"]) == args["replica_cpus"]
    assert workers["minReplicas"] <= args["min_replicas"]
    assert workers["maxReplicas"] >= args["max_replicas"]
    template = workers["template"]
    assert template["metadata"]["annotations"]["prometheus.io/port"] == str(args["metrics_port"])
    container = template["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"] == IMPORT_PATH
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/health"
    summary = json.loads(MEASURED.read_text())["summary"]
    peak = max(config["replica_rss_mib_max"] for config in summary.values())
    assert mib(container["resources"]["requests"]["memory"]) >= peak
