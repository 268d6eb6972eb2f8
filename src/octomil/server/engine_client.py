"""Async client of the engine: one worker thread owns every MLX call; the event loop never blocks.

MLX is not thread-safe for one model, so a single daemon thread runs all engine work. It drives
the engine's :class:`~octomil.engine.scheduler.Scheduler` (continuous batching, chunked prefill,
KV admission): this module is only the bridge between that thread and the event loop — an
inbox of new requests, a queue of token events per request, cancellation, admission control and
a drain for shutdown. Prompts are tokenized by the caller (off the engine thread) before
:meth:`EngineClient.generate`.

Admission is bounded by ``max_concurrency`` requests in flight (waiting + running): beyond it
:class:`ServerBusyError` is raised at once, which the HTTP layer answers with 429. A slot is taken
with :meth:`EngineClient.reserve` *before* any work on the request (tokenizing), so a flood of
large bodies cannot queue work the server will refuse anyway.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol, TypeVar

from octomil.engine.generation import Generation
from octomil.engine.scheduler import Scheduler, SchedulerConfig, StepOutput
from octomil.engine.tool_syntax import ToolSyntax
from octomil.engine.types import GenerationRequest, GenerationStats, TokenEvent

logger = logging.getLogger("octomil.server")
T = TypeVar("T")


class EngineLike(Protocol):
    """What the server needs from :class:`octomil.engine.engine.Engine`."""

    model_id: str
    total_layers: int
    context_length: int
    prefill_chunk: int
    max_prompt_chars: int
    tool_syntax: ToolSyntax

    def encode_chat(self, messages: list[dict[str, Any]], tools: Any = None) -> list[int]: ...

    def encode(self, text: str) -> list[int]: ...

    def generate(self, request: GenerationRequest) -> Generation: ...

    def default_kv_budget(self) -> int: ...


class ServerBusyError(Exception):
    """More than ``max_concurrency`` requests are waiting or running."""


class EngineStoppedError(Exception):
    """The worker is shut down, or draining for shutdown."""


class GenerationAbortedError(Exception):
    """The request was ended by the server (shutdown deadline, engine failure)."""


# Messages from the worker to a request's asyncio queue.
@dataclass(frozen=True)
class _Started:
    pass


@dataclass(frozen=True)
class _Failed:
    error: BaseException


@dataclass(frozen=True)
class _Done:
    pass


class Slot:
    """An admission slot: taken before any work on a request, released exactly once."""

    def __init__(self, client: EngineClient) -> None:
        self._client = client
        self._released = False
        self.owned = False  # handed to a running job, which releases it when it ends

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._client._release()

    def __enter__(self) -> Slot:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.owned:
            self.release()


@dataclass(eq=False)
class _Job:
    request: GenerationRequest
    slot: Slot
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue[Any]
    cancelled: threading.Event = field(default_factory=threading.Event)
    generation: Generation | None = None

    def send(self, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.out.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass


@dataclass(eq=False)
class _Call:
    fn: Callable[[], Any]
    loop: asyncio.AbstractEventLoop | None
    future: asyncio.Future[Any] | None


class GenerationStream:
    """Async view of one generation: iterate for :class:`TokenEvent`, then read ``stats``."""

    def __init__(self, client: EngineClient, job: _Job) -> None:
        self._client = client
        self._job = job
        self._finished = False

    @property
    def request(self) -> GenerationRequest:
        return self._job.request

    @property
    def stats(self) -> GenerationStats:
        assert self._job.generation is not None
        return self._job.generation.stats

    def cancel(self) -> None:
        """Stop generating (thread-safe, idempotent); the slot is freed before the next token."""
        if self._finished:
            return
        self._job.cancelled.set()
        gen = self._job.generation
        if gen is not None:
            gen.cancel()
        self._client._wake()

    async def __aiter__(self) -> AsyncIterator[TokenEvent]:
        try:
            while True:
                item = await self._job.out.get()
                if isinstance(item, _Done):
                    self._finished = True
                    return
                if isinstance(item, _Failed):
                    self._finished = True
                    raise item.error
                yield item
        finally:
            # Consumer went away (disconnect, exception, break): stop the generation.
            if not self._finished:
                self.cancel()


class EngineClient:
    """Owns the engine worker thread. ``close()`` to stop."""

    def __init__(
        self,
        loader: Callable[[], EngineLike],
        *,
        max_concurrency: int = 64,
        max_batch_size: int = 16,
        max_kv_tokens: int | Literal["auto"] | None = None,
        prefill_chunk: int | None = None,
        on_step: Callable[[StepOutput, EngineClient], None] | None = None,
    ) -> None:
        """Start the worker, which first runs ``loader()``: MLX graphs built on one thread cannot
        be evaluated on another ("There is no Stream(cpu, 0) in current thread"), so the model is
        loaded on the same thread that later generates. ``max_kv_tokens``: the KV budget
        (``"auto"``: the engine's default for this machine's memory; None: unbounded).
        ``prefill_chunk``: prompt tokens fed per step (the engine's default when None)."""
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be >= 1")
        if prefill_chunk is not None and prefill_chunk < 1:
            raise ValueError("prefill_chunk must be >= 1")
        self._loader = loader
        self._engine: EngineLike | None = None
        self.load_error: BaseException | None = None
        self._loaded = threading.Event()
        self.max_concurrency = max_concurrency
        self._kv_budget = max_kv_tokens
        budget = None if max_kv_tokens == "auto" else max_kv_tokens
        self.scheduler_config = SchedulerConfig(max_batch_size, budget)
        self._prefill_chunk = prefill_chunk
        self.on_step = on_step
        self._scheduler = Scheduler(self.scheduler_config)
        self._inbox: queue.SimpleQueue[_Job | _Call | None] = queue.SimpleQueue()
        self._jobs: dict[int, _Job] = {}  # id(generation) -> job
        self._admitted = 0  # slots taken: waiting + running (+ being tokenized)
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._draining = threading.Event()
        self._last_step = time.monotonic()
        self._thread = threading.Thread(target=self._worker, name="octomil-engine", daemon=True)
        self._thread.start()

    @property
    def engine(self) -> EngineLike:
        if self._engine is None:
            raise EngineStoppedError("the model is not loaded")
        return self._engine

    @property
    def ready(self) -> bool:
        return self._engine is not None and not self._stopped.is_set()

    def wait_loaded(self, timeout: float | None = None) -> EngineLike:
        """Block until the loader finished; re-raise its error."""
        if not self._loaded.wait(timeout):
            raise TimeoutError("model loading timed out")
        if self.load_error is not None:
            raise self.load_error
        return self.engine

    async def loaded(self) -> EngineLike:
        await asyncio.to_thread(self._loaded.wait)
        if self.load_error is not None:
            raise self.load_error
        return self.engine

    # ------------------------------------------------------------------ event-loop side

    @property
    def waiting(self) -> int:
        return self._scheduler.waiting

    @property
    def running(self) -> int:
        return self._scheduler.running

    @property
    def admitted(self) -> int:
        return self._admitted

    @property
    def kv_tokens_reserved(self) -> int:
        return self._scheduler.kv_tokens_reserved

    def step_age(self) -> float:
        """Seconds since the engine last finished a step while it had work (0 when idle):
        a load balancer's signal that the engine thread is stuck."""
        if self._scheduler.idle and self._inbox.empty():
            return 0.0
        return time.monotonic() - self._last_step

    def reserve(self) -> Slot:
        """Take an admission slot (raises ServerBusyError / EngineStoppedError at once)."""
        if self._stopped.is_set() or self._draining.is_set():
            raise EngineStoppedError("the server is shutting down")
        with self._lock:
            if self._admitted >= self.max_concurrency:
                raise ServerBusyError(
                    f"server busy: {self._admitted} requests in flight "
                    f"(max_concurrency={self.max_concurrency}); retry later"
                )
            self._admitted += 1
        return Slot(self)

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the engine thread and await its result."""
        if self._stopped.is_set():
            raise EngineStoppedError("the engine is shutting down")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._inbox.put(_Call(lambda: fn(*args), loop, future))
        return await future

    async def generate(
        self, request: GenerationRequest, slot: Slot | None = None
    ) -> GenerationStream:
        """Submit a request under ``slot`` (one is reserved when None); raises ServerBusyError,
        EngineStoppedError or the engine's input errors."""
        slot = slot or self.reserve()
        with slot:
            # Draining refuses new admissions (reserve); a request admitted before it may finish.
            if self._stopped.is_set():
                raise EngineStoppedError("the server is shutting down")
            loop = asyncio.get_running_loop()
            job = _Job(request, slot, loop, asyncio.Queue())
            slot.owned = True
            self._inbox.put(job)
            try:
                first = await job.out.get()
            except BaseException:
                job.cancelled.set()
                self._wake()
                raise
            if isinstance(first, _Failed):
                raise first.error
        return GenerationStream(self, job)

    def drain(self, timeout: float) -> None:
        """Stop admitting; let requests in flight finish for ``timeout`` seconds, then end the
        rest with :class:`GenerationAbortedError`. Blocks; call from a thread."""
        self._draining.set()
        deadline = time.monotonic() + timeout
        while self._admitted and time.monotonic() < deadline:
            time.sleep(0.05)
        if self._admitted:
            self._inbox.put(_Call(self._abort_all, None, None))
            end = time.monotonic() + 5.0
            while self._admitted and time.monotonic() < end:
                time.sleep(0.05)

    def close(self, timeout: float = 5.0) -> None:
        self._stopped.set()
        self._inbox.put(None)
        self._thread.join(timeout)

    def _wake(self) -> None:
        # An empty call: lets a worker blocked on the inbox notice a cancellation.
        self._inbox.put(_Call(lambda: None, None, None))

    def _release(self) -> None:
        with self._lock:
            self._admitted -= 1

    # ------------------------------------------------------------------ worker side

    def _worker(self) -> None:
        try:
            engine = self._loader()
            if self._prefill_chunk is not None:
                engine.prefill_chunk = self._prefill_chunk
            if self._kv_budget == "auto":
                self.scheduler_config = replace(
                    self.scheduler_config, max_kv_tokens=engine.default_kv_budget()
                )
                self._scheduler = Scheduler(self.scheduler_config)
            self._engine = engine
        except BaseException as exc:  # noqa: BLE001 - reported through wait_loaded()/loaded()
            self.load_error = exc
            self._stopped.set()
        finally:
            self._loaded.set()
        while not self._stopped.is_set():
            idle = self._scheduler.idle
            try:
                item = self._inbox.get(block=idle)
            except queue.Empty:
                item = ...
            while item is not ...:
                if item is None:
                    break
                self._accept(item)
                try:
                    item = self._inbox.get_nowait()
                except queue.Empty:
                    item = ...
            if item is None:
                break
            if idle:
                self._last_step = time.monotonic()  # an idle engine is not a stuck one
            if not self._scheduler.idle:
                self._step()
        self._shutdown()

    def _accept(self, item: _Job | _Call) -> None:
        if isinstance(item, _Call):
            try:
                result = item.fn()
            except BaseException as exc:  # noqa: BLE001 - handed back to the caller
                if item.future is not None:
                    _resolve(item.loop, item.future, error=exc)
            else:
                if item.future is not None:
                    _resolve(item.loop, item.future, result=result)
            return
        job = item
        if job.cancelled.is_set():
            self._finish(job, _Done())
            return
        try:
            # Engine.generate and Scheduler.submit validate before doing any work: quick.
            job.generation = self.engine.generate(job.request)
            self._scheduler.submit(job.generation)
        except BaseException as exc:  # noqa: BLE001 - handed back to the caller
            self._finish(job, _Failed(exc))
            return
        self._jobs[id(job.generation)] = job
        job.send(_Started())

    def _step(self) -> None:
        for job in self._jobs.values():
            if job.cancelled.is_set() and job.generation is not None:
                job.generation.cancel()  # cancelled before the stream was handed out
        try:
            out = self._scheduler.step()
        except Exception as exc:  # an engine bug: fail the requests in flight, keep serving
            logger.exception("engine step failed")
            self._abort_all(GenerationAbortedError(f"the engine failed: {exc}"))
            return
        self._last_step = time.monotonic()
        for gen, event in out.events:
            job = self._jobs.get(id(gen))
            if job is not None and not job.cancelled.is_set():
                job.send(event)
        for gen in out.finished:
            job = self._jobs.pop(id(gen), None)
            if job is not None:
                self._finish(job, _Done())
        if self.on_step is not None:
            self.on_step(out, self)

    def _abort_all(self, error: BaseException | None = None) -> None:
        """End every request in flight with ``error`` (a fresh scheduler replaces the old)."""
        error = error or GenerationAbortedError(
            "the server is shutting down; the request was ended before it finished"
        )
        for job in self._jobs.values():
            if job.generation is not None:
                job.generation.stats.finish_reason = "aborted"
            self._finish(job, _Failed(error))
        self._jobs.clear()
        self._scheduler = Scheduler(self.scheduler_config)

    def _finish(self, job: _Job, final: Any) -> None:
        job.slot.release()
        job.send(final)

    def _shutdown(self) -> None:
        self._abort_all(GenerationAbortedError("the server is shutting down"))
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, _Job):
                self._finish(item, _Failed(EngineStoppedError("the server is shutting down")))
            elif isinstance(item, _Call) and item.future is not None:
                _resolve(item.loop, item.future, error=EngineStoppedError("shutting down"))


def _resolve(
    loop: asyncio.AbstractEventLoop | None,
    future: asyncio.Future[Any],
    *,
    result: Any = None,
    error: BaseException | None = None,
) -> None:
    def settle() -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    if loop is None:
        return
    try:
        loop.call_soon_threadsafe(settle)
    except RuntimeError:
        pass
