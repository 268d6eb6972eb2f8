"""What a new user hit (issue 9): a long prompt stalled everyone, huge bodies were tokenized on the
engine thread before admission, and shutdown cut open streams. Real server, real embedded model.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time

import httpx
from conftest import MODEL, ServerProcess, start_server

# Small prefill chunks so that a ~1,500-token prompt takes many engine steps.
SERVER_ARGS = ("--max-prefill-tokens-per-step", "32", "--max-concurrency", "16")
LONG_PROMPT = " ".join(f"item{i} is filed under shelf {i % 17}." for i in range(220))


def _chat(content: str, max_tokens: int, stream: bool = False) -> dict:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
    }


async def _timed(client: httpx.AsyncClient, body: dict) -> tuple[float, httpx.Response]:
    start = time.perf_counter()
    r = await client.post("/v1/chat/completions", json=body)
    return time.perf_counter() - start, r


def test_short_request_is_not_stalled_by_a_long_prefill(server: ServerProcess) -> None:
    """Regression: a long prompt's prefill ran in one piece and blocked every other request
    (a 33-token request took 140 s behind a 7,031-token prompt)."""

    async def main() -> None:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=600) as c:
            long_task = asyncio.create_task(_timed(c, _chat(LONG_PROMPT, 4)))
            await asyncio.sleep(1.0)  # the long prompt is being read
            short_s, short = await _timed(c, _chat("Say hi.", 8))
            long_s, long = await long_task
            assert short.status_code == long.status_code == 200
            assert long.json()["usage"]["prompt_tokens"] > 1000
            # The short request finished long before the long prompt was read, not after it.
            assert short_s < 0.5 * long_s, (short_s, long_s)

    asyncio.run(main())


def test_huge_bodies_are_refused_before_work(server: ServerProcess) -> None:
    """Regression: 8 concurrent 3.9 MB prompts were tokenized on the engine thread before being
    refused, and a small request's latency rose from 0.3 s to 11.8 s."""
    huge = "lorem ipsum " * 320_000  # 3.8 MB: within the body limit, far beyond the context

    async def main() -> None:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=600) as c:
            alone, _ = await _timed(c, _chat("Say hi.", 4))
            floods = [asyncio.create_task(_timed(c, _chat(huge, 4))) for _ in range(8)]
            await asyncio.sleep(0.05)
            loaded, small = await _timed(c, _chat("Say hi.", 4))
            results = await asyncio.gather(*floods)
            assert small.status_code == 200
            for _, r in results:
                assert r.status_code == 400
                assert r.json()["error"]["code"] == "context_length_exceeded"
            # The 8 refusals cost the small request little (ratio to itself alone).
            assert loaded < 4 * alone + 1.0, (loaded, alone)

    asyncio.run(main())


def test_sigterm_drains_then_ends_open_streams_cleanly() -> None:
    """Regression: SIGTERM cut open streams with no [DONE] and no error event."""
    srv = start_server("--shutdown-timeout", "1")
    try:
        with httpx.Client(base_url=srv.base_url, timeout=60) as c:
            with c.stream("POST", "/v1/chat/completions", json=_chat("Count.", 2000, True)) as r:
                lines = r.iter_lines()
                assert next(line for line in lines if line.startswith("data: {"))
                srv.proc.send_signal(signal.SIGTERM)
                rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"
        chunks = [json.loads(line[6:]) for line in rest[:-1]]
        assert chunks[-1]["error"]["code"] == "shutting_down"
        assert chunks[-2]["choices"][0]["finish_reason"] == "abort"
        assert srv.proc.wait(timeout=30) == 0
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()
            srv.proc.wait()


def test_sigterm_lets_a_short_request_finish() -> None:
    srv = start_server("--shutdown-timeout", "30")
    try:

        async def main() -> httpx.Response:
            async with httpx.AsyncClient(base_url=srv.base_url, timeout=60) as c:
                task = asyncio.create_task(c.post("/v1/chat/completions", json=_chat("Hi", 24)))
                # Signal once the request is admitted (a fixed sleep raced a busy machine).
                while not task.done() and (await c.get("/health")).json()["requests_running"] < 1:
                    await asyncio.sleep(0.02)
                srv.proc.send_signal(signal.SIGTERM)
                return await task

        r = asyncio.run(main())
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] > 0
        assert srv.proc.wait(timeout=60) == 0
    except subprocess.TimeoutExpired:
        raise AssertionError(srv.output()) from None
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()
            srv.proc.wait()
