"""Concurrent streams from several clients, one disconnecting mid-stream: the others complete, the
disconnected generation stops within a token or so and its slot is freed."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
from conftest import MODEL, ServerProcess
from prometheus_client.parser import text_string_to_metric_families

SERVER_ARGS = ("--speed-quality", "balanced", "--max-concurrency", "4", "--max-batch-size", "4")


def _body(max_tokens: int) -> dict:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Tell me a story about a robot."}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def _full_stream(client: httpx.AsyncClient, max_tokens: int) -> dict:
    usage = None
    done = False
    async with client.stream("POST", "/v1/chat/completions", json=_body(max_tokens)) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                chunk = json.loads(line[6:])
                usage = chunk.get("usage") or usage
    assert done
    return usage


async def _disconnecting_stream(client: httpx.AsyncClient, after_chunks: int) -> int:
    seen = 0
    async with client.stream("POST", "/v1/chat/completions", json=_body(200)) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                seen += 1
                if seen >= after_chunks:
                    break  # leaving the block closes the connection mid-stream
    return seen


def _metric(base_url: str, name: str, **labels: str) -> float:
    """Value of one sample (0 when the labelled series does not exist yet)."""
    text = httpx.get(f"{base_url}/metrics").text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


def test_streams_complete_while_one_client_disconnects(server: ServerProcess) -> None:
    cancelled_before = _metric(
        server.base_url, "octomil_request_finished_total", finish_reason="cancelled"
    )

    async def main() -> tuple[list[dict], int]:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=120) as client:
            results = await asyncio.gather(
                _full_stream(client, 6),
                _full_stream(client, 8),
                _disconnecting_stream(client, 3),
            )
        return list(results[:2]), results[2]

    usages, seen = asyncio.run(main())
    assert seen == 3
    assert all(1 <= u["completion_tokens"] <= m for u, m in zip(usages, (6, 8), strict=True))

    # The disconnected request is cancelled (not run to its 200 tokens) and its slot freed.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        stats = httpx.get(f"{server.base_url}/v1/early-exit/stats").json()
        if stats["requests_running"] == 0 and stats["requests_waiting"] == 0:
            break
        time.sleep(0.1)
    assert stats["requests_running"] == 0 and stats["requests_waiting"] == 0
    assert _metric(server.base_url, "octomil_requests_running") == 0
    cancelled = _metric(
        server.base_url, "octomil_request_finished_total", finish_reason="cancelled"
    )
    assert cancelled == cancelled_before + 1
    # Far fewer than 200 tokens were generated in total.
    generated = _metric(server.base_url, "octomil_generation_tokens_total")
    assert generated < 6 + 8 + 3 + 10


def test_all_slots_usable_after_disconnects(server: ServerProcess) -> None:
    async def main() -> list[dict]:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=120) as client:
            return await asyncio.gather(*(_full_stream(client, 2) for _ in range(4)))

    assert all(u["completion_tokens"] <= 2 for u in asyncio.run(main()))
