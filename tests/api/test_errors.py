"""Every client error answers in OpenAI's shape with the right status; never a 500 or a hang.

The server runs with an API key, max-concurrency 1 (for 429) and telemetry headers off.
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from conftest import MODEL, ServerProcess

KEY = "sk-test-octomil"
SERVER_ARGS = ("--api-key", KEY, "--max-concurrency", "1", "--no-telemetry-headers")
AUTH = {"Authorization": f"Bearer {KEY}"}
MSG = [{"role": "user", "content": "Hi"}]


def _post(
    server: ServerProcess,
    path: str,
    body: object = None,
    *,
    content: bytes | None = None,
    headers: dict | None = None,
) -> httpx.Response:
    return httpx.post(
        f"{server.base_url}{path}",
        json=body if content is None else None,
        content=content,
        headers={**AUTH, "Content-Type": "application/json", **(headers or {})},
        timeout=60,
    )


def _error(r: httpx.Response, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"]
    if param is not None:
        assert err["param"] == param, err
    return err


def chat(**kw: object) -> dict:
    return {"model": MODEL, "messages": MSG, "max_tokens": 2, **kw}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": MODEL, "messages": []}, "messages"),
        ({"model": MODEL}, "messages"),
        ({"messages": MSG}, "model"),
        ({"model": MODEL, "messages": "hello"}, "messages"),
        ({"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
        ({"model": MODEL, "messages": [{"content": "hi"}]}, "messages.0.role"),
        (chat(max_tokens=0), "max_tokens"),
        (chat(max_tokens=-5), "max_tokens"),
        (chat(max_tokens="many"), "max_tokens"),
        (chat(max_tokens=10**9), "max_tokens"),
        (chat(max_completion_tokens=0), "max_completion_tokens"),
        (chat(temperature=3), "temperature"),
        (chat(temperature="hot"), "temperature"),
        (chat(top_p=1.5), "top_p"),
        (chat(n=2), "n"),
        (chat(stop=["a", "b", "c", "d", "e"]), "stop"),
        (chat(top_logprobs=3), "top_logprobs"),
        (chat(logprobs=True, top_logprobs=50), "top_logprobs"),
        (chat(early_exit={"threshold": 1.5}), "early_exit.threshold"),
        (chat(early_exit={"threshold": -0.1}), "early_exit.threshold"),
        (chat(early_exit={"speed_quality": "ludicrous"}), "early_exit.speed_quality"),
        (chat(early_exit={"bogus": 1}), "early_exit.bogus"),
        (chat(early_exit="yes please"), "early_exit"),
        (
            chat(response_format={"type": "json_schema", "json_schema": {"name": "x"}}),
            "response_format",
        ),
        (chat(frequency_penalty=0.5), "frequency_penalty"),
        (chat(seed=2**70), "seed"),
    ],
)
def test_chat_bad_requests_are_400(server: ServerProcess, body: dict, param: str) -> None:
    err = _error(_post(server, "/v1/chat/completions", body), 400, param)
    assert err["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": MODEL, "prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"model": MODEL, "prompt": ""}, "prompt"),
        ({"model": MODEL, "prompt": []}, "prompt"),
        ({"model": MODEL, "prompt": [10**9]}, "prompt"),
        ({"model": MODEL, "prompt": [-1]}, "prompt"),
        ({"model": MODEL, "prompt": ["a", "b"]}, "prompt"),
        ({"model": MODEL, "prompt": "x", "logprobs": 9}, "logprobs"),
        ({"model": MODEL, "prompt": "x", "echo": True}, "echo"),
        ({"model": MODEL, "prompt": "x", "n": 3}, "n"),
    ],
)
def test_completion_bad_requests_are_400(server: ServerProcess, body: dict, param: str) -> None:
    _error(_post(server, "/v1/completions", body), 400, param)


def test_malformed_json_is_400(server: ServerProcess) -> None:
    err = _error(_post(server, "/v1/chat/completions", content=b'{"model": '), 400)
    assert err["code"] == "invalid_json"
    _error(_post(server, "/v1/chat/completions", content=b"[1, 2]"), 400)
    _error(_post(server, "/v1/chat/completions", content=b""), 400)


def test_unknown_model_is_404(server: ServerProcess) -> None:
    err = _error(_post(server, "/v1/chat/completions", chat(model="gpt-9")), 404, "model")
    assert err["code"] == "model_not_found"
    _error(_post(server, "/v1/completions", {"model": "gpt-9", "prompt": "x"}), 404, "model")


def test_unknown_route_is_404_in_error_shape(server: ServerProcess) -> None:
    _error(httpx.get(f"{server.base_url}/v1/nothing", headers=AUTH), 404)
    r = httpx.get(f"{server.base_url}/v1/chat/completions", headers=AUTH)
    _error(r, 405)


def test_prompt_longer_than_context_is_400(server: ServerProcess) -> None:
    long_text = "word " * 9000  # > 8192 tokens
    body = chat(messages=[{"role": "user", "content": long_text}])
    err = _error(_post(server, "/v1/chat/completions", body), 400, "messages")
    assert err["code"] == "context_length_exceeded"
    err = _error(
        _post(server, "/v1/completions", {"model": MODEL, "prompt": long_text}), 400, "prompt"
    )
    assert err["code"] == "context_length_exceeded"


def test_oversize_body_is_413(server: ServerProcess) -> None:
    big = b'{"model": "x", "prompt": "' + b"a" * (5 * 1024 * 1024) + b'"}'
    err = _error(_post(server, "/v1/completions", content=big), 413)
    assert err["code"] == "request_too_large"


def test_oversize_chunked_body_is_413(server: ServerProcess) -> None:
    def chunks():  # noqa: ANN202 - no Content-Length: the limit is counted while reading
        for _ in range(6):
            yield b"a" * (1024 * 1024)

    r = httpx.post(
        f"{server.base_url}/v1/completions",
        content=chunks(),
        headers={**AUTH, "Content-Type": "application/json"},
        timeout=60,
    )
    _error(r, 413)


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": "Bearer"}],
)
def test_missing_or_wrong_api_key_is_401(server: ServerProcess, headers: dict) -> None:
    for path in ("/v1/chat/completions", "/v1/models"):
        r = httpx.request(
            "POST" if "chat" in path else "GET",
            f"{server.base_url}{path}",
            json=chat(),
            headers=headers,
            timeout=30,
        )
        err = _error(r, 401)
        assert err["type"] == "authentication_error"
    # Health and metrics stay open for probes and Prometheus.
    assert httpx.get(f"{server.base_url}/health").status_code == 200
    assert httpx.get(f"{server.base_url}/metrics").status_code == 200


def test_no_telemetry_headers_flag(server: ServerProcess) -> None:
    r = _post(server, "/v1/chat/completions", chat(temperature=0))
    assert r.status_code == 200, r.text
    assert not [h for h in r.headers if h.lower().startswith("x-octomil-")]
    assert r.json()["usage"]["early_exit"]["total_layers"] == 30  # the body still has it


def test_over_max_concurrency_is_429_then_recovers(server: ServerProcess) -> None:
    started = threading.Event()
    result: dict = {}

    def long_stream() -> None:
        with httpx.stream(
            "POST",
            f"{server.base_url}/v1/chat/completions",
            json=chat(max_tokens=24, stream=True),
            headers=AUTH,
            timeout=120,
        ) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    started.set()
            result["status"] = r.status_code

    t = threading.Thread(target=long_stream)
    t.start()
    assert started.wait(60)
    err = _error(_post(server, "/v1/chat/completions", chat()), 429)
    assert err["type"] == "rate_limit_error"
    t.join(120)
    assert result["status"] == 200
    # The slot is free again.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        r = _post(server, "/v1/chat/completions", chat())
        if r.status_code == 200:
            break
        time.sleep(0.2)
    assert r.status_code == 200, r.text


def test_metrics_count_errors_by_status(server: ServerProcess) -> None:
    text = httpx.get(f"{server.base_url}/metrics").text
    for status in ("400", "401", "404", "413", "429"):
        assert f'status="{status}"' in text, status
    assert 'status="500"' not in text
