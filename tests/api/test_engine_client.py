"""Engine client scheduling: one worker thread, bounded admission (429), cancel frees the slot.

Uses a deterministic engine double (tests/api/fake_engine.py) so timing-sensitive behaviour is
pinned exactly; the HTTP tests in this folder use the real engine.
"""

from __future__ import annotations

import asyncio

import pytest
from fake_engine import FakeEngine

from octomil.engine.errors import EngineInputError
from octomil.engine.types import GenerationRequest, SamplingParams
from octomil.server.engine_client import EngineClient, ServerBusyError


def _req(n: int) -> GenerationRequest:
    return GenerationRequest(prompt_tokens=(1, 2, 3), sampling=SamplingParams(max_tokens=n))


async def _drain(stream) -> list:  # noqa: ANN001
    return [e async for e in stream]


def test_all_engine_work_runs_on_the_single_worker_thread() -> None:
    engine = FakeEngine()

    async def main() -> None:
        client = EngineClient(lambda: engine, max_concurrency=4, max_running=2)
        try:
            await client.loaded()
            streams = [await client.generate(_req(5)) for _ in range(3)]
            results = await asyncio.gather(*(_drain(s) for s in streams))
            assert [len(r) for r in results] == [5, 5, 5]
            assert results[0][-1].finish_reason == "length"
            assert all(s.stats.completion_tokens == 5 for s in streams)
            names = set().union(*(g.thread_names for g in engine.generations))
            assert names == {"octomil-engine"}
            assert client.admitted == 0
        finally:
            client.close()

    asyncio.run(main())


def test_admission_beyond_max_concurrency_is_refused_then_freed() -> None:
    engine = FakeEngine(delay=0.02)

    async def main() -> None:
        client = EngineClient(lambda: engine, max_concurrency=2, max_running=1)
        try:
            await client.loaded()
            a = await client.generate(_req(20))
            b = await client.generate(_req(20))
            with pytest.raises(ServerBusyError):
                await client.generate(_req(1))
            await _drain(a)
            await _drain(b)
            assert client.admitted == 0
            assert len(await _drain(await client.generate(_req(2)))) == 2
        finally:
            client.close()

    asyncio.run(main())


def test_cancel_stops_within_one_token_and_frees_the_slot() -> None:
    engine = FakeEngine(delay=0.02)

    async def main() -> None:
        client = EngineClient(lambda: engine, max_concurrency=2, max_running=2)
        try:
            await client.loaded()
            keep = await client.generate(_req(30))
            drop = await client.generate(_req(1000))
            got = 0
            async for _ in drop:
                got += 1
                if got == 3:
                    break  # like a client disconnecting mid-stream
            # aclose() runs the stream's finally (sse-starlette cancels the task the same way).
            await drop.__aiter__().aclose()
            drop.cancel()
            for _ in range(50):
                if client.admitted == 1:
                    break
                await asyncio.sleep(0.01)
            assert client.admitted == 1
            gen = engine.generations[1]
            assert gen.stats.completion_tokens <= 5
            assert len(await _drain(keep)) == 30
            assert client.admitted == 0
        finally:
            client.close()

    asyncio.run(main())


def test_validation_errors_come_back_before_any_token() -> None:
    async def main() -> None:
        client = EngineClient(lambda: FakeEngine(), max_concurrency=1)
        try:
            await client.loaded()
            with pytest.raises(EngineInputError):
                await client.generate(_req(5000))
            assert client.admitted == 0
            assert await client.call(lambda x: x + 1, 41) == 42
        finally:
            client.close()

    asyncio.run(main())


def test_loader_failure_is_reported() -> None:
    def broken():  # noqa: ANN202
        raise ValueError("no such model")

    async def main() -> None:
        client = EngineClient(broken)
        with pytest.raises(ValueError, match="no such model"):
            await client.loaded()
        client.close()

    asyncio.run(main())


def test_streamed_tokens_are_not_held_back_by_one() -> None:
    """Regression: serving.run() once delayed every token until the next arrived (TTFT + 1 ITL)."""
    from octomil.server.app import build_state
    from octomil.server.serving import ServeOptions, run

    engine = FakeEngine(delay=0.15)

    async def main() -> None:
        client = EngineClient(lambda: engine)
        try:
            await client.loaded()
            state = build_state(engine, client, ServeOptions())
            stream = await client.generate(_req(3))
            seen = []
            async for event in run(state, stream, arrival=0.0, prompt_tokens=3):
                # When token i reaches us the engine has not produced token i + 1 yet.
                seen.append((event.token_id, engine.generations[0].stats.completion_tokens))
            assert seen == [(0, 1), (1, 2), (2, 3)]
        finally:
            client.close()

    asyncio.run(main())
