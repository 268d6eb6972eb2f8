"""Operating early exit end to end: the kill switch behind the admin key and the override ceiling.

The server exits on the raw shared head (``--exit-policy lens``), so tokens do leave early on the
embedded model (its calibrated policy places no check: presets serve full depth there).
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from conftest import MODEL, ServerProcess

KEY = "sk-ops"
ADMIN = "adm-ops"
AUTH = {"Authorization": f"Bearer {KEY}"}
ADMIN_AUTH = {"Authorization": f"Bearer {ADMIN}"}
SERVER_ARGS = (
    *("--exit-policy", "lens", "--speed-quality", "balanced"),
    *("--api-key", KEY, "--admin-key", ADMIN),
    *("--policy-file", str(Path(__file__).parents[2] / "configs" / "exit-policy.example.yaml")),
)
MSG = [{"role": "user", "content": "Write one sentence about the sea."}]


def _chat(server: ServerProcess, **body: object) -> dict:
    payload = {"model": MODEL, "messages": MSG, "max_tokens": 8, "temperature": 0, **body}
    r = httpx.post(f"{server.base_url}/v1/chat/completions", json=payload, headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def _admin(server: ServerProcess, method: str = "GET", headers: dict | None = None, **body: object):
    return httpx.request(
        method,
        f"{server.base_url}/admin/early-exit",
        json=body if method == "POST" else None,
        headers=ADMIN_AUTH if headers is None else headers,
        timeout=30,
    )


@pytest.mark.parametrize(
    ("headers", "status", "code"),
    [
        ({}, 401, "missing_api_key"),
        ({"Authorization": "Bearer wrong"}, 401, "invalid_api_key"),
        (AUTH, 403, "not_admin"),
    ],
)
def test_admin_refuses_a_missing_wrong_or_non_admin_key(
    server: ServerProcess, headers: dict, status: int, code: str
) -> None:
    for method in ("GET", "POST"):
        r = _admin(server, method, headers, enabled=False)
        assert r.status_code == status, r.text
        assert r.json()["error"]["code"] == code
    assert _admin(server).json()["enabled"] is True  # nothing changed


def test_kill_switch_turns_early_exit_off_and_on(server: ServerProcess) -> None:
    before = _chat(server)["usage"]["early_exit"]
    assert before["early_exit_tokens"] > 0
    state = _admin(server, "POST", enabled=False).json()
    assert (state["enabled"], state["reason"]) == (False, "admin_off")
    assert state["last_change"]["by"].startswith("admin-key-")
    assert httpx.get(f"{server.base_url}/health").json()["early_exit"] == {
        "enabled": False,
        "reason": "admin_off",
    }
    metrics = httpx.get(f"{server.base_url}/metrics").text
    assert f'octomil_early_exit_enabled{{model="{MODEL}",reason="admin_off"}} 0.0' in metrics
    off = _chat(server, early_exit={"speed_quality": "fast"})["usage"]["early_exit"]
    assert (off["early_exit_tokens"], off["min_layers_used"]) == (
        0,
        30,
    )  # the client cannot undo it
    state = _admin(server, "POST", enabled=True).json()
    assert (state["enabled"], state["reason"]) == (True, "configured")
    assert _chat(server)["usage"]["early_exit"] == before
    assert "early exit changed by admin-key-" in server.output()


def test_admin_changes_the_default_preset_at_run_time(server: ServerProcess) -> None:
    quality = _chat(server, early_exit={"speed_quality": "quality"})
    state = _admin(server, "POST", speed_quality="quality").json()
    assert (state["reason"], state["default"]["preset"]) == ("admin_set", "quality")
    now = _chat(server)
    assert now["choices"] == quality["choices"] and now["usage"] == quality["usage"]
    r = _admin(server, "POST", threshold=2.0)
    assert r.status_code == 400 and r.json()["error"]["param"] == "threshold"
    _admin(server, "POST", speed_quality="balanced")


def test_a_more_aggressive_client_override_is_capped_at_the_ceiling(server: ServerProcess) -> None:
    ceiling = _chat(server, early_exit={"threshold": 0.3, "min_layers": 0.5})
    pushy = _chat(server, early_exit={"threshold": 1.0, "min_layers": 0.1})
    assert pushy["usage"] == ceiling["usage"] and pushy["choices"] == ceiling["choices"]
    assert pushy["usage"]["early_exit"]["min_layers_used"] >= 15  # 50% of 30 layers
    # More conservative than the ceiling is the client's right.
    careful = _chat(server, early_exit={"speed_quality": "quality"})["usage"]["early_exit"]
    assert careful["min_layers_used"] >= 23  # 75% of 30 layers


def test_task_classes_pick_their_preset(server: ServerProcess) -> None:
    default = _chat(server)["usage"]["early_exit"]
    assert default["early_exit_tokens"] > 0
    r = httpx.post(
        f"{server.base_url}/v1/chat/completions",
        json={"model": MODEL, "messages": MSG, "max_tokens": 8, "temperature": 0},
        headers={**AUTH, "X-Octomil-Task": "json"},
        timeout=60,
    )
    json_task = r.json()["usage"]["early_exit"]
    assert (json_task["early_exit_tokens"], json_task["min_layers_used"]) == (0, 30)
    code = _chat(server, task="code")["usage"]["early_exit"]  # quality: 75% of 30 layers
    assert code["min_layers_used"] >= 23
    assert _chat(server, task="poetry")["usage"]["early_exit"] == default  # unknown: default


def _stats(server: ServerProcess) -> dict:
    return httpx.get(f"{server.base_url}/v1/early-exit/stats", headers=AUTH, timeout=30).json()


def _gauges(server: ServerProcess) -> dict[str, float]:
    text = httpx.get(f"{server.base_url}/metrics", timeout=30).text
    wanted = ("octomil_early_exit_", "octomil_early_exit_enabled{")
    return {
        line.rsplit(" ", 1)[0].replace(f'model="{MODEL}"', "").replace(",", ""): float(
            line.rsplit(" ", 1)[1]
        )
        for line in text.splitlines()
        if line.startswith(wanted) and not line.startswith("octomil_early_exit_tokens")
    }


def test_stats_and_gauges_follow_the_kill_switch(server: ServerProcess) -> None:
    """Regression: /v1/early-exit/stats and the gauges kept the startup settings after a POST."""
    keys = ("enabled", "reason", "preset", "threshold", "min_layers", "effective")
    start = _stats(server)
    assert [start[k] for k in keys] == [True, "configured", "balanced", 0.3, 15, True]
    assert start["checks_after_layers"] == [15, 18, 22]
    _admin(server, "POST", enabled=False)
    assert [_stats(server)[k] for k in keys] == [False, "admin_off", None, None, 30, False]
    assert _stats(server)["checks_after_layers"] == []
    assert _gauges(server) == {
        "octomil_early_exit_threshold{}": 0.0,
        'octomil_early_exit_enabled{reason="admin_off"}': 0.0,
        "octomil_early_exit_effective{}": 0.0,
        "octomil_early_exit_checks_placed{}": 0.0,
        "octomil_early_exit_min_layers{}": 30.0,
    }
    _admin(server, "POST", enabled=True, speed_quality="quality")
    quality = _stats(server)
    assert [quality[k] for k in keys] == [True, "admin_set", "quality", 0.1, 23, False]
    assert quality["checks_after_layers"] == []  # no check pays this deep on the raw head
    _admin(server, "POST", threshold=0.4, min_layers=0.6)
    custom = _stats(server)
    assert [custom[k] for k in keys] == [True, "admin_set", None, 0.4, 18, True]
    assert custom["checks_after_layers"] == [18, 20, 22]
    assert _gauges(server)["octomil_early_exit_threshold{}"] == 0.4
    _admin(server, "POST", speed_quality="balanced")
    back = _stats(server)
    assert [back[k] for k in keys] == [start[k] for k in keys]
    assert back["checks_after_layers"] == start["checks_after_layers"]
    assert _gauges(server) == {
        "octomil_early_exit_threshold{}": 0.3,
        'octomil_early_exit_enabled{reason="configured"}': 1.0,
        "octomil_early_exit_effective{}": 1.0,
        "octomil_early_exit_checks_placed{}": 3.0,
        "octomil_early_exit_min_layers{}": 15.0,
    }
