"""Keys and limits end to end: several API keys, the admin key, per-key rate and in-flight limits,
request limits (body, prompt tokens, max_tokens, messages) and request ids.

Each test uses its own API key, so the per-key limits of one test never touch another's.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import MODEL, ServerProcess, start_server, stop_server

KEYS = ("sk-a", "sk-b", "sk-c", "sk-d", "sk-e")
ADMIN = "adm-secret"
MSG = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    keys_file = Path(tmp_path_factory.mktemp("keys")) / "keys.txt"
    keys_file.write_text("# one key per line\n" + "\n".join(KEYS[1:]) + "  # team b..e\n")
    srv = start_server(
        *("--api-key", KEYS[0], "--api-keys-file", str(keys_file), "--admin-key", ADMIN),
        *("--rate-limit", "2/8s", "--max-streams-per-key", "1", "--max-body-bytes", "2048"),
        *("--max-prompt-tokens", "40", "--max-tokens-limit", "16", "--max-messages", "3"),
        *("--log-format", "json"),
    )
    try:
        yield srv
    finally:
        stop_server(srv)


def _chat(server: ServerProcess, key: str, **body: object) -> httpx.Response:
    payload = {"model": MODEL, "messages": MSG, "max_tokens": 2, "temperature": 0, **body}
    return httpx.post(
        f"{server.base_url}/v1/chat/completions",
        json=payload,
        headers={"Authorization": f"Bearer {key}"},
        timeout=60,
    )


def _error(r: httpx.Response, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == code, err
    return err


def test_every_configured_key_is_accepted_and_others_are_401(server: ServerProcess) -> None:
    for key in (KEYS[0], KEYS[3]):  # one from --api-key, one from the file
        r = httpx.get(f"{server.base_url}/v1/models", headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200, r.text
    r = httpx.get(f"{server.base_url}/v1/models", headers={"Authorization": "Bearer sk-z"})
    assert _error(r, 401, "invalid_api_key")["type"] == "authentication_error"
    # The admin key is for /admin only.
    r = httpx.get(f"{server.base_url}/v1/models", headers={"Authorization": f"Bearer {ADMIN}"})
    _error(r, 401, "invalid_api_key")


def test_request_limits_are_clear_4xx(server: ServerProcess) -> None:
    key = KEYS[1]
    err = _error(_chat(server, key, messages=MSG * 4), 400, "too_many_messages")
    assert err["param"] == "messages"
    err = _error(_chat(server, key, max_tokens=17), 400, "max_tokens_too_large")
    assert err["param"] == "max_tokens"
    long = [{"role": "user", "content": "word " * 60}]  # 2 requests per key and 8 s: another
    _error(_chat(server, KEYS[4], messages=long), 400, "prompt_too_long")
    r = httpx.post(
        f"{server.base_url}/v1/chat/completions",
        content=json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x" * 3000}]}),
        headers={"Authorization": f"Bearer {KEYS[0]}", "Content-Type": "application/json"},
    )
    _error(r, 413, "request_too_large")


def test_rate_limit_gives_429_with_retry_after_then_recovers(server: ServerProcess) -> None:
    key = KEYS[2]
    # The rate is spent before any work: two quick 404s use this key's 2 requests per 8 s.
    for _ in range(2):
        _error(_chat(server, key, model="no-such-model"), 404, "model_not_found")
    r = _chat(server, key)
    _error(r, 429, "rate_limit_exceeded")
    wait = int(r.headers["Retry-After"])
    assert 1 <= wait <= 4
    assert _chat(server, KEYS[4]).status_code == 200  # another key is not limited
    time.sleep(wait)
    assert _chat(server, key).status_code == 200


def test_second_stream_of_a_key_is_429_until_the_first_ends(server: ServerProcess) -> None:
    key = KEYS[3]
    started = threading.Event()
    result: list[int] = []

    def stream() -> None:
        payload = {"model": MODEL, "messages": MSG, "max_tokens": 16, "stream": True}
        with httpx.stream(
            "POST",
            f"{server.base_url}/v1/chat/completions",
            json=payload,
            headers={"Authorization": f"Bearer {key}"},
            timeout=60,
        ) as r:
            lines = r.iter_lines()
            next(lines)  # the first chunk: the stream is in flight
            started.set()
            time.sleep(1.0)
            result.append(sum(1 for _ in lines))

    t = threading.Thread(target=stream)
    t.start()
    assert started.wait(60)
    _error(_chat(server, key), 429, "too_many_streams")
    t.join(60)
    assert result and result[0] > 0
    assert _chat(server, key).status_code == 200  # the refused one spent no rate


def test_request_id_is_echoed_or_generated_and_logged(server: ServerProcess) -> None:
    headers = {"Authorization": f"Bearer {KEYS[0]}", "X-Request-Id": "trace-42"}
    r = httpx.get(f"{server.base_url}/v1/models", headers=headers)
    assert r.headers["x-request-id"] == "trace-42"
    r = httpx.get(f"{server.base_url}/v1/models")  # 401 still carries one
    generated = r.headers["x-request-id"]
    assert generated.startswith("req-") and len(generated) == 28
    time.sleep(0.2)
    logged = [json.loads(line) for line in server.output().splitlines() if line.startswith("{")]
    ids = {rec["request_id"] for rec in logged if rec["logger"] == "uvicorn.access"}
    assert {"trace-42", generated} <= ids
