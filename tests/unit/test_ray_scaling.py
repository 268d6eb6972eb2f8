"""``octomil serve --ray`` replica counts: the flags' bounds, and the deployment options Ray
Serve accepts for them (its own config validation runs in ``Deployment.options``)."""

from __future__ import annotations

import pytest

pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'octomil[ray]')")

from octomil.config import ConfigError  # noqa: E402
from octomil.server.ray_cli import RayFlags  # noqa: E402
from octomil.server.ray_deployment import OctomilReplica, Scaling  # noqa: E402


def scaling(low: int, high: int, initial: int) -> Scaling:
    return Scaling(
        min_replicas=low,
        max_replicas=high,
        initial_replicas=initial,
        target_ongoing_requests=8.0,
        cpus_per_replica=1.0,
        max_ongoing_requests=64,
        graceful_shutdown_timeout_s=30.0,
    )


def test_replicas_alone_are_a_fixed_count() -> None:
    flags = RayFlags(
        replicas=3, min_replicas=None, max_replicas=None, replica_cpus=1.0, metrics_port=None
    )
    assert flags.bounds == (3, 3)
    deployment = OctomilReplica.options(**scaling(3, 3, 3).deployment_options())
    assert deployment.num_replicas == 3
    assert deployment._deployment_config.autoscaling_config is None
    assert deployment.ray_actor_options["num_cpus"] == 1.0
    assert deployment.max_ongoing_requests == 64


def test_min_max_replicas_autoscale_on_ongoing_requests() -> None:
    flags = RayFlags(
        replicas=2, min_replicas=None, max_replicas=4, replica_cpus=1.0, metrics_port=None
    )
    assert flags.bounds == (1, 4)
    deployment = OctomilReplica.options(**scaling(1, 4, 2).deployment_options())
    auto = deployment._deployment_config.autoscaling_config
    assert (auto.min_replicas, auto.initial_replicas, auto.max_replicas) == (1, 2, 4)
    assert auto.target_ongoing_requests == 8.0


@pytest.mark.parametrize(
    ("replicas", "low", "high", "message"),
    [
        (0, None, None, "--replicas must be >= 1, got 0"),
        (3, None, 2, "--replicas 3 must lie within --min-replicas 1 and --max-replicas 2"),
        (1, 2, 4, "--replicas 1 must lie within --min-replicas 2 and --max-replicas 4"),
        (1, 0, 2, "--min-replicas must be >= 1, got 0"),
    ],
)
def test_bad_bounds_name_the_flag(
    replicas: int, low: int | None, high: int | None, message: str
) -> None:
    with pytest.raises(ConfigError) as err:
        RayFlags(replicas, low, high, replica_cpus=1.0, metrics_port=None).check()
    assert str(err.value) == message


def test_metrics_ports_must_fit_below_65536() -> None:
    with pytest.raises(ConfigError) as err:
        RayFlags(2, 1, 4, replica_cpus=1.0, metrics_port=65533).check()
    assert str(err.value) == (
        "--metrics-port must leave room for 4 replica ports below 65536, got 65533"
    )
