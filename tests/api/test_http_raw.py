"""Raw HTTP (httpx and a real curl): telemetry headers match the body, /metrics counters move."""

from __future__ import annotations

import json
import subprocess

import httpx
import pytest
from conftest import MODEL, ServerProcess
from prometheus_client.parser import text_string_to_metric_families

SERVER_ARGS = ("--speed-quality", "fast")
CHAT = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Name a colour."}],
    "max_tokens": 6,
    "temperature": 0,
}


def _metrics(base_url: str) -> dict[str, float]:
    """Flatten /metrics into {"name{label=value,...}": value} (model label dropped)."""
    r = httpx.get(f"{base_url}/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    out = {}
    families = list(text_string_to_metric_families(r.text))
    # prometheus_client's standard process collector (RSS, CPU, fds) keeps its own names.
    assert "process_resident_memory_bytes" in {s.name for f in families for s in f.samples}
    for family in families:
        for s in family.samples:
            if s.name.startswith("process_"):
                continue
            assert s.name.startswith("octomil_")
            assert s.labels.get("model") == MODEL
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "model")
            out[f"{s.name}{{{labels}}}"] = s.value
    return out


def _check_headers_match_usage(headers: httpx.Headers, usage: dict) -> None:
    ee = usage["early_exit"]
    assert int(headers["x-octomil-early-exit-tokens"]) == ee["early_exit_tokens"]
    assert headers["x-octomil-avg-layers-used"] == f"{ee['avg_layers_used']:.1f}"
    assert int(headers["x-octomil-total-layers"]) == ee["total_layers"] == 30


def test_health_and_models(server: ServerProcess) -> None:
    health = httpx.get(f"{server.base_url}/health").json()
    assert health["status"] == "ok" and health["engine_step_age_s"] == 0.0  # idle engine
    models = httpx.get(f"{server.base_url}/v1/models").json()
    assert models["object"] == "list"
    assert models["data"][0]["id"] == MODEL
    assert models["data"][0]["total_layers"] == 30


def test_startup_lines_are_printed_in_order(server: ServerProcess) -> None:
    lines = server.output().splitlines()
    engine = next(i for i, line in enumerate(lines) if line.startswith("[engine] Selected: mlx"))
    # Regression: the line said "Enabled" alone while the shipped policy places no check here.
    assert lines[engine + 1] == (
        "[early-exit] Enabled: threshold=0.5, min_layers=25% — policy: no check pays on this "
        "machine, serving full depth"
    )
    assert lines[engine + 2] == f"[serve] Listening on http://127.0.0.1:{server.port}"


def test_httpx_headers_consistent_with_usage(server: ServerProcess) -> None:
    r = httpx.post(f"{server.base_url}/v1/chat/completions", json=CHAT, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    _check_headers_match_usage(r.headers, body["usage"])
    assert 1 <= body["usage"]["completion_tokens"] <= 6


def test_curl_completion_headers_match_body(server: ServerProcess) -> None:
    out = subprocess.run(
        [
            "curl",
            "-sS",
            "-D",
            "-",
            f"{server.base_url}/v1/completions",
            "-H",
            "Content-Type: application/json",
            "-d",
            json.dumps({"model": MODEL, "prompt": "Once upon a time", "max_tokens": 5}),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    head, _, body = out.partition("\n\n")  # text mode turned \r\n into \n
    assert head.startswith("HTTP/1.1 200")
    headers = httpx.Headers([tuple(h.split(": ", 1)) for h in head.splitlines()[1:] if ": " in h])
    usage = json.loads(body)["usage"]
    _check_headers_match_usage(headers, usage)
    assert usage["completion_tokens"] <= 5


def test_curl_streaming_ends_with_done(server: ServerProcess) -> None:
    out = subprocess.run(
        [
            "curl",
            "-sN",
            f"{server.base_url}/v1/chat/completions",
            "-H",
            "Content-Type: application/json",
            "-d",
            json.dumps({**CHAT, "stream": True, "max_tokens": 4}),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    events = [line[len("data: ") :] for line in out.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    final = chunks[-1]
    assert final["choices"][0]["finish_reason"] in ("stop", "length")
    assert final["early_exit"]["total_layers"] == 30


def test_metrics_counters_move_after_a_request(server: ServerProcess) -> None:
    before = _metrics(server.base_url)
    r = httpx.post(f"{server.base_url}/v1/chat/completions", json=CHAT, timeout=60)
    assert r.status_code == 200
    usage = r.json()["usage"]
    after = _metrics(server.base_url)

    def delta(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    n = usage["completion_tokens"]
    assert delta("octomil_requests_total{endpoint=/v1/chat/completions,status=200}") == 1
    assert delta("octomil_prompt_tokens_total{}") == usage["prompt_tokens"]
    assert delta("octomil_generation_tokens_total{}") == n
    assert delta("octomil_early_exit_tokens_total{}") == usage["early_exit"]["early_exit_tokens"]
    assert delta("octomil_layers_used_per_token_count{}") == n
    assert delta("octomil_layers_used_per_token_sum{}") == pytest.approx(
        usage["early_exit"]["avg_layers_used"] * n, abs=0.01
    )
    assert delta("octomil_time_to_first_token_seconds_count{}") == 1
    assert delta("octomil_inter_token_latency_seconds_count{}") == n - 1
    assert delta("octomil_e2e_request_latency_seconds_count{}") == 1
    exits = sum(v for k, v in after.items() if k.startswith("octomil_exit_layer_total")) - sum(
        v for k, v in before.items() if k.startswith("octomil_exit_layer_total")
    )
    assert exits == usage["early_exit"]["early_exit_tokens"]
    assert after["octomil_total_layers{}"] == 30
    assert after["octomil_early_exit_threshold{}"] == 0.5
    assert after["octomil_early_exit_enabled{reason=configured}"] == 1
    # Regression: only "enabled" was exported, though no check is placed (full depth).
    assert after["octomil_early_exit_effective{}"] == 0
    assert after["octomil_early_exit_checks_placed{}"] == 0
    assert after["octomil_requests_running{}"] == 0
    assert after["octomil_requests_waiting{}"] == 0
    # Buckets 1..30: one per possible depth.
    assert "octomil_layers_used_per_token_bucket{le=30.0}" in after
    assert "octomil_layers_used_per_token_bucket{le=1.0}" in after


def test_early_exit_stats_endpoint(server: ServerProcess) -> None:
    stats = httpx.get(f"{server.base_url}/v1/early-exit/stats").json()
    assert stats["enabled"] is True
    assert stats["effective"] is False and stats["checks_after_layers"] == []
    assert stats["threshold"] == 0.5 and stats["preset"] == "fast"
    assert stats["min_layers"] == 8  # ceil(25% of 30)
    assert stats["total_layers"] == 30
    assert stats["tokens"] >= 1
    assert sum(stats["exit_layer_counts"].values()) == stats["early_exit_tokens"]
