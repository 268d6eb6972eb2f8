"""``--request-timeout`` end to end: a generation that runs past it ends the documented way.

Non-streaming: 504 ``request_timeout`` (type ``timeout_error``, ``x-should-retry: false``);
streaming: the tokens so far, one error event, then ``[DONE]``. A neighbour that started with
them finishes with the answer it gets alone, and the engine frees the timed-out slots.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest
from conftest import MODEL, ServerProcess

# Long enough for the neighbour's three tokens on this shared, loaded machine.
TIMEOUT_S = 12
SERVER_ARGS = ("--request-timeout", str(TIMEOUT_S), "--max-concurrency", "4")
# The end-of-turn token (<|im_end|>, id 2) is banned, so all 1000 tokens are generated: at most
# ~30 tok/s per stream here, well past the timeout on any machine (regression: unbanned, the answer
# ended within 12 s on a quiet machine and the test failed).
LONG = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Count from 1 to 1000, separated by commas."}],
    "max_tokens": 1000,
    "temperature": 0,
    "logit_bias": {"2": -100},
}
SHORT = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Name a fruit."}],
    "max_tokens": 3,
    "temperature": 0,
}
MESSAGE = f"the request did not finish within {TIMEOUT_S} s (--request-timeout)"


async def _stream(client: httpx.AsyncClient) -> list[str]:
    async with client.stream("POST", "/v1/chat/completions", json={**LONG, "stream": True}) as r:
        assert r.status_code == 200
        return [line async for line in r.aiter_lines() if line.startswith("data: ")]


async def _neighbour(client: httpx.AsyncClient) -> dict:
    await asyncio.sleep(0.5)  # starts while both long requests run
    r = await client.post("/v1/chat/completions", json=SHORT)
    assert r.status_code == 200, r.text
    return r.json()


def _finished(base_url: str, reason: str) -> float:
    for line in httpx.get(f"{base_url}/metrics").text.splitlines():
        if line.startswith("octomil_request_finished_total{") and f'"{reason}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _sdk(base_url: str) -> openai.InternalServerError:
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused")  # max_retries=2
    with pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(**LONG)
    return caught.value


def test_timed_out_requests_end_the_openai_way_and_free_their_slots(
    server: ServerProcess,
) -> None:
    """Regression (sdk): the openai SDK retried a timed-out request twice (no x-should-retry)."""
    alone = httpx.post(f"{server.base_url}/v1/chat/completions", json=SHORT, timeout=60).json()

    async def main() -> tuple[httpx.Response, list[str], openai.InternalServerError, dict]:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=120) as client:
            return await asyncio.gather(
                client.post("/v1/chat/completions", json=LONG),
                _stream(client),
                asyncio.to_thread(_sdk, server.base_url),
                _neighbour(client),
            )

    plain, lines, sdk, neighbour = asyncio.run(main())
    assert plain.status_code == 504
    assert plain.headers["x-should-retry"] == "false"
    assert plain.json() == {
        "error": {
            "message": MESSAGE,
            "type": "timeout_error",
            "param": None,
            "code": "request_timeout",
        }
    }
    assert (sdk.status_code, sdk.code) == (504, "request_timeout")
    *tokens, error, done = lines
    assert done == "data: [DONE]"
    assert json.loads(error.removeprefix("data: ")) == plain.json()
    assert json.loads(tokens[0][6:])["choices"][0]["delta"]["role"] == "assistant"
    assert all(json.loads(t[6:])["choices"][0]["finish_reason"] is None for t in tokens)
    assert neighbour["choices"] == alone["choices"] and neighbour["usage"] == alone["usage"]

    deadline = time.monotonic() + 30  # the engine ends the generations at its next step
    while time.monotonic() < deadline:
        stats = httpx.get(f"{server.base_url}/v1/early-exit/stats").json()
        if stats["requests_running"] == 0 and stats["requests_waiting"] == 0:
            break
        time.sleep(0.1)
    assert (stats["requests_running"], stats["requests_waiting"]) == (0, 0)
    assert _finished(server.base_url, "timeout") == 3  # the SDK's request ran once


def test_memory_gauges_are_exported(server: ServerProcess) -> None:
    text = httpx.get(f"{server.base_url}/metrics").text
    values = {
        line.split("{")[0].split(" ")[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(("process_resident_memory_bytes", "octomil_mlx_"))
    }
    assert sorted(values) == [
        "octomil_mlx_active_memory_bytes",
        "octomil_mlx_cache_memory_bytes",
        "octomil_mlx_peak_memory_bytes",
        "process_resident_memory_bytes",
    ]
    # The model's weights are MLX arrays, so active memory is never empty.
    assert values["octomil_mlx_active_memory_bytes"] > 0
    assert values["process_resident_memory_bytes"] > values["octomil_mlx_cache_memory_bytes"]
