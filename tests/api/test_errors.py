"""Every client error answers in OpenAI's shape with the right status; never a 500 or a hang.

The server runs with an API key, max-concurrency 1 (for 429) and telemetry headers off.
"""

from __future__ import annotations

import json
import re
import socket
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
        (chat(n=17), "n"),
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
            "response_format.json_schema.schema",
        ),
        (chat(frequency_penalty=2.5), "frequency_penalty"),
        (chat(logit_bias={"x": 1}), "logit_bias"),
        (chat(logit_bias={"5": 101}), "logit_bias.5"),
        (chat(logit_bias={"999999": 1}), "logit_bias"),
        (chat(seed=2**70), "seed"),
        # Regression: booleans were taken as integers (max_tokens: true -> 1), strings as
        # booleans (early_exit: "yes" -> true).
        (chat(max_tokens=True), "max_tokens"),
        (chat(temperature=False), "temperature"),
        (chat(early_exit="yes"), "early_exit"),
        (chat(stream="yes"), "stream"),
        (chat(logprobs="true"), "logprobs"),
        (chat(early_exit={"threshold": True}), "early_exit.threshold"),
        # Regression: fields that would change the answer were accepted and silently ignored.
        (chat(tools=[{"type": "function", "function": {}}]), "tools.0.function.name"),
        (chat(tool_choice="auto"), "tool_choice"),
        (chat(functions=[{"name": "f"}]), "functions"),
        (chat(function_call={"name": "f"}), "function_call"),
        (chat(messages=[{"role": "user", "content": "hi", "name": "bob"}]), "messages.0.name"),
        (chat(top_k=1), "top_k"),
        (
            chat(stream_options={"include_usage": True, "chunk_size": 3}),
            "stream_options.chunk_size",
        ),
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
        ({"model": MODEL, "prompt": "x", "n": 17}, "n"),
        ({"model": MODEL, "prompt": "x", "best_of": 3}, "best_of"),
        ({"model": MODEL, "prompt": "x", "logit_bias": {"5": -101}}, "logit_bias.5"),
        ({"model": MODEL, "prompt": "x", "max_tokens": True}, "max_tokens"),
        ({"model": MODEL, "prompt": "x", "logprobs": True}, "logprobs"),
        ({"model": MODEL, "prompt": [1, True]}, "prompt.1"),
        ({"model": MODEL, "prompt": "x", "echo": "no"}, "echo"),
    ],
)
def test_completion_bad_requests_are_400(server: ServerProcess, body: dict, param: str) -> None:
    _error(_post(server, "/v1/completions", body), 400, param)


def test_unsupported_fields_say_why(server: ServerProcess) -> None:
    err = _error(_post(server, "/v1/chat/completions", chat(functions=[{"name": "f"}])), 400)
    assert err["message"] == "'functions' is not supported: deprecated by OpenAI: use tools"
    assert err["code"] == "unsupported_parameter"
    err = _error(_post(server, "/v1/chat/completions", chat(top_k=1)), 400, "top_k")
    assert err["message"] == "unrecognized request argument: 'top_k'"
    assert err["code"] == "unknown_parameter"


def test_no_op_values_of_unsupported_fields_are_accepted(server: ServerProcess) -> None:
    """What SDKs send when nothing is asked for (no tools, best_of 1, an echoed assistant
    message) changes nothing, so it is not refused."""
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!", "refusal": None, "tool_calls": None},
        {"role": "user", "content": "Bye"},
    ]
    body = chat(messages=messages, tools=[], tool_choice="none", logit_bias={})
    assert _post(server, "/v1/chat/completions", body).status_code == 200
    body = {"model": MODEL, "prompt": "x", "max_tokens": 1, "best_of": 1}
    assert _post(server, "/v1/completions", body).status_code == 200


def test_five_stop_sequences_say_at_most_4(server: ServerProcess) -> None:
    """Regression: the message was pydantic's "List should have at most 4 items"."""
    err = _error(_post(server, "/v1/chat/completions", chat(stop=list("abcde"))), 400, "stop")
    assert "at most 4 stop sequences" in err["message"]


# A lone UTF-16 surrogate: json.dumps writes it as the escape \ud800, valid JSON but not text.
LONE = "\ud800"
COMPLETION = {"model": MODEL, "prompt": "x", "max_tokens": 1}
SURROGATE_BODIES = [
    (
        "/v1/chat/completions",
        chat(messages=[{"role": "user", "content": LONE}]),
        "messages.0.content",
    ),
    (
        "/v1/chat/completions",
        chat(messages=[{"role": "system", "content": "a" + LONE}, *MSG]),
        "messages.0.content",
    ),
    (
        "/v1/chat/completions",
        chat(messages=[{"role": "user", "content": [{"type": "text", "text": LONE}]}]),
        "messages.0.content.0.text",
    ),
    ("/v1/chat/completions", chat(stop=["ok", LONE]), "stop.1"),
    ("/v1/completions", {**COMPLETION, "prompt": LONE}, "prompt"),
    ("/v1/completions", {**COMPLETION, "prompt": [LONE]}, "prompt.0"),
    ("/v1/completions", {**COMPLETION, "stop": LONE}, "stop"),
    ("/v1/completions", {**COMPLETION, "model": LONE}, "model"),
]


@pytest.mark.parametrize(("path", "body", "param"), SURROGATE_BODIES)
def test_lone_surrogates_are_400_and_keep_the_connection(
    server: ServerProcess, path: str, body: dict, param: str
) -> None:
    """Regression: a lone UTF-16 surrogate reached the tokenizer (TypeError, HTTP 500) and the
    connection was reset for the next request on it."""
    raw = json.dumps(body).encode()
    assert b"\\ud800" in raw
    with httpx.Client(base_url=server.base_url, headers=AUTH, timeout=60) as client:
        r = client.post(path, content=raw, headers={"Content-Type": "application/json"})
        err = _error(r, 400, param)
        assert "surrogate" in err["message"]
        ok = client.post("/v1/completions", json={**COMPLETION, "prompt": "Hi"})
        assert ok.status_code == 200, ok.text


def _exchange(sock: socket.socket, path: str, body: bytes) -> tuple[int, bytes]:
    """One HTTP/1.1 request on an open keep-alive socket; (status, body) of its answer."""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    sock.sendall(head.encode() + body)
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536) or b"<closed>"
        assert not data.endswith(b"<closed>"), data
    headers, _, rest = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length: *(\d+)", headers).group(1))
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed mid-response"
        rest += chunk
    return int(headers.split(b" ", 2)[1]), rest


def test_lone_surrogate_then_a_request_on_the_same_raw_connection(server: ServerProcess) -> None:
    """Regression (raw bytes, one socket): the 500 reset the keep-alive connection."""
    bad = b'{"model":"%s","messages":[{"role":"user","content":"\\ud800"}]}' % MODEL.encode()
    good = json.dumps({**COMPLETION, "prompt": "Hi"}).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
        status, body = _exchange(sock, "/v1/chat/completions", bad)
        assert status == 400, body
        assert json.loads(body)["error"]["param"] == "messages.0.content"
        status, body = _exchange(sock, "/v1/completions", good)
        assert status == 200, body


def test_lone_surrogate_in_a_key_is_400(server: ServerProcess) -> None:
    raw = json.dumps({**COMPLETION, LONE: 1}).encode()
    err = _error(_post(server, "/v1/completions", content=raw), 400)
    assert "unicode" in err["message"]


def test_invalid_utf8_bytes_are_400(server: ServerProcess) -> None:
    body = b'{"model":"%s","prompt":"\xff\xfe"}' % MODEL.encode()
    _error(_post(server, "/v1/completions", content=body), 400)


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
