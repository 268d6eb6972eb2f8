"""Shadow checks and the drift alarm end to end, against a real server on the raw shared head.

Two servers with the same aggressive policy (``--exit-policy lens --speed-quality fast``): one
plain, one with every exit shadow-checked and ``--auto-fallback``. The shadowed server must answer
exactly as the plain one until its drift alarm trips; then it serves full depth (observe mode).
"""

from __future__ import annotations

import httpx
import pytest
from conftest import MODEL, ServerProcess, start_server, stop_server
from prometheus_client.parser import text_string_to_metric_families

POLICY = ("--exit-policy", "lens", "--speed-quality", "fast")
# A window longer than one answer (16 tokens): the first request cannot trip it; the next do.
SHADOW = ("--shadow-rate", "1.0", "--auto-fallback", "--drift-window", "17")
PROMPTS = ["Tell me about the moon.", "Name three fruits.", "What is rain?", "Why is grass green?"]


@pytest.fixture(scope="module")
def servers():  # noqa: ANN201
    plain = start_server(*POLICY)
    try:
        shadowed = start_server(*POLICY, *SHADOW)
        try:
            yield plain, shadowed
        finally:
            stop_server(shadowed)
    finally:
        stop_server(plain)


def _chat(server: ServerProcess, prompt: str, **extra: object) -> dict:
    body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], **extra}
    body = {"max_tokens": 16, "temperature": 0, **body}
    r = httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def _shadow_totals(server: ServerProcess) -> tuple[float, float]:
    text = httpx.get(f"{server.base_url}/metrics").text
    checked = disagreed = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "octomil_shadow_checked_tokens_total":
                assert s.labels["preset"] == "fast"
                checked += s.value
            elif s.name == "octomil_shadow_disagreements_total":
                disagreed += s.value
    return checked, disagreed


def test_shadow_counters_move_and_the_response_is_unchanged(servers) -> None:
    plain, shadowed = servers
    want = _chat(plain, PROMPTS[0])
    got = _chat(shadowed, PROMPTS[0])
    assert got["choices"] == want["choices"] and got["usage"] == want["usage"]
    exits = got["usage"]["early_exit"]["early_exit_tokens"]
    checked, disagreed = _shadow_totals(shadowed)
    # Every exit is checked once its catch-up row reached the last layer: all but the last
    # few (the answer ended while their rows were pending).
    assert 0 < checked <= exits
    assert 0 <= disagreed <= checked
    assert _shadow_totals(plain) == (0, 0)


def test_aggressive_policy_trips_the_alarm_and_falls_back_to_full_depth(servers) -> None:
    plain, shadowed = servers
    for prompt in PROMPTS[1:]:
        _chat(shadowed, prompt)
        health = httpx.get(f"{shadowed.base_url}/health").json()
        if not health["early_exit"]["enabled"]:
            break
    assert health["early_exit"] == {"enabled": False, "reason": "drift_fallback"}
    assert "drift alarm: preset fast disagrees with full depth" in shadowed.output()
    metrics = httpx.get(f"{shadowed.base_url}/metrics").text
    assert f'octomil_early_exit_enabled{{model="{MODEL}",reason="drift_fallback"}} 0.0' in metrics
    # Fallback: full depth, token for token what full depth gives; would-be exits still checked.
    before, _ = _shadow_totals(shadowed)
    got = _chat(shadowed, PROMPTS[0])
    want = _chat(plain, PROMPTS[0], early_exit=False)
    assert got["choices"] == want["choices"]
    assert got["usage"]["early_exit"]["early_exit_tokens"] == 0
    assert got["usage"]["early_exit"]["min_layers_used"] == 30
    assert _shadow_totals(shadowed)[0] > before
