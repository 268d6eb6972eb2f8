"""The engine client (server/engine_client.py): the bridge between the event loop and the engine
thread. A tiny real engine (random llama) serves the requests; no engine double.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from tiny_models import make_tiny_model, tiny_engine

from octomil.engine.errors import EngineInputError
from octomil.engine.types import GenerationRequest, SamplingParams
from octomil.server.engine_client import (
    EngineClient,
    EngineStoppedError,
    GenerationAbortedError,
    ServerBusyError,
)


def _req(n: int, seed: int = 0) -> GenerationRequest:
    prompt = tuple(5 + (seed * 31 + i * 7) % 200 for i in range(6))
    return GenerationRequest(prompt, SamplingParams(max_tokens=n, ignore_eos=True))


async def _drain(stream) -> list:  # noqa: ANN001
    return [e async for e in stream]


@pytest.fixture(scope="module")
def engine(byte_tokenizer):
    return tiny_engine(make_tiny_model("llama"), byte_tokenizer)


def _run(engine, body, **kwargs) -> None:  # noqa: ANN001
    async def main() -> None:
        client = EngineClient(lambda: engine, **kwargs)
        try:
            await client.loaded()
            await body(client)
        finally:
            client.close()

    asyncio.run(main())


def test_concurrent_streams_match_each_alone(engine) -> None:
    """Batched on the worker thread, each stream gets the tokens it gets alone."""
    alone = [[e.token_id for e in engine.generate(_req(12, s))] for s in range(3)]

    async def body(client: EngineClient) -> None:
        streams = [await client.generate(_req(12, s)) for s in range(3)]
        results = await asyncio.gather(*(_drain(s) for s in streams))
        assert [[e.token_id for e in r] for r in results] == alone
        assert all(r[-1].finish_reason == "length" for r in results)
        assert all(s.stats.completion_tokens == 12 for s in streams)
        assert client.admitted == 0 and client.step_age() == 0.0

    _run(engine, body, max_concurrency=4, max_batch_size=4)


def test_admission_beyond_max_concurrency_is_refused_then_freed(engine) -> None:
    async def body(client: EngineClient) -> None:
        a = await client.generate(_req(40))
        slot = client.reserve()  # e.g. a request being tokenized holds a slot too
        with pytest.raises(ServerBusyError):
            await client.generate(_req(1))
        slot.release()
        await _drain(a)
        assert client.admitted == 0
        assert len(await _drain(await client.generate(_req(2)))) == 2

    _run(engine, body, max_concurrency=2)


def test_cancel_stops_the_generation_and_frees_the_slot(engine) -> None:
    async def body(client: EngineClient) -> None:
        keep = await client.generate(_req(30, 1))
        drop = await client.generate(_req(400, 2))
        got = 0
        async for _ in drop:
            got += 1
            if got == 3:
                break  # like a client disconnecting mid-stream
        await drop.__aiter__().aclose()
        drop.cancel()
        for _ in range(200):
            if client.admitted == 1:
                break
            await asyncio.sleep(0.01)
        assert client.admitted == 1
        assert drop.stats.finish_reason == "cancelled" and drop.stats.completion_tokens < 400
        assert len(await _drain(keep)) == 30
        assert client.admitted == 0

    _run(engine, body, max_concurrency=2)


def test_validation_errors_come_back_before_any_token(engine) -> None:
    async def body(client: EngineClient) -> None:
        with pytest.raises(EngineInputError):
            await client.generate(_req(5000))  # beyond the context length
        assert client.admitted == 0
        assert await client.call(lambda x: x + 1, 41) == 42

    _run(engine, body, max_concurrency=1)


def test_kv_budget_refuses_a_request_that_can_never_fit(engine) -> None:
    async def body(client: EngineClient) -> None:
        with pytest.raises(EngineInputError, match="KV budget"):
            await client.generate(_req(100))
        assert client.admitted == 0
        assert len(await _drain(await client.generate(_req(10)))) == 10

    _run(engine, body, max_kv_tokens=50)


def test_drain_lets_requests_finish_then_aborts_the_rest(engine) -> None:
    """Regression: shutdown cut open streams with no end; now short ones finish, long ones are
    ended with GenerationAbortedError, and new requests are refused."""

    async def body(client: EngineClient) -> None:
        short = await client.generate(_req(5, 1))
        long = await client.generate(_req(500, 2))  # ~2 s alone on this CPU
        drained = threading.Thread(target=client.drain, args=(0.3,))
        drained.start()
        await asyncio.sleep(0.05)
        with pytest.raises(EngineStoppedError):
            client.reserve()
        assert len(await _drain(short)) == 5
        with pytest.raises(GenerationAbortedError):
            await _drain(long)
        await asyncio.to_thread(drained.join)
        assert client.admitted == 0

    _run(engine, body, max_kv_tokens=None)


def test_a_request_admitted_before_drain_is_served(engine) -> None:
    """Regression: a request admitted (slot taken) but still being tokenized when SIGTERM came
    was refused with 503 instead of being let finish like the requests already decoding."""

    async def body(client: EngineClient) -> None:
        slot = client.reserve()
        drained = threading.Thread(target=client.drain, args=(30.0,))
        drained.start()
        await asyncio.sleep(0.05)
        with pytest.raises(EngineStoppedError):
            client.reserve()  # new admissions are refused
        assert len(await _drain(await client.generate(_req(4, 1), slot))) == 4
        await asyncio.to_thread(drained.join)
        assert client.admitted == 0

    _run(engine, body, max_kv_tokens=None)


def test_loader_failure_is_reported() -> None:
    def broken():  # noqa: ANN202
        raise ValueError("no such model")

    async def main() -> None:
        client = EngineClient(broken)
        with pytest.raises(ValueError, match="no such model"):
            await client.loaded()
        client.close()

    asyncio.run(main())


def test_step_age_grows_while_the_engine_thread_is_stuck(engine) -> None:
    """Regression: /health stayed 200 while the engine was stuck; its step age now shows it."""

    async def body(client: EngineClient) -> None:
        stream = await client.generate(_req(50))
        stuck = asyncio.create_task(client.call(time.sleep, 1.0))  # blocks the engine thread
        await asyncio.sleep(0.6)
        assert client.step_age() > 0.4
        await stuck
        assert len(await _drain(stream)) == 50
        assert client.step_age() == 0.0

    _run(engine, body)
