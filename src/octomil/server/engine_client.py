"""Async client of the engine: one worker thread owns every MLX call; the event loop never blocks.

MLX is not thread-safe for one model, so a single daemon thread runs all engine work:
tokenizing, validating and stepping generations. Requests arrive through a thread-safe inbox;
tokens go back to each request's ``asyncio.Queue`` via ``loop.call_soon_threadsafe``.

Scheduling: up to ``max_running`` generations are stepped round-robin, one token each per turn
(so concurrent streams all make progress); the rest wait in FIFO order. Admission is bounded by
``max_concurrency`` (waiting + running): beyond it :class:`ServerBusyError` is raised at once,
which the HTTP layer answers with 429. Cancelling a stream (a client that disconnects) calls
``Generation.cancel()`` and the worker drops it before its next token, freeing the slot.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from octomil.engine.types import GenerationRequest, GenerationStats, TokenEvent

logger = logging.getLogger("octomil.server")
T = TypeVar("T")


class GenerationLike(Protocol):
    stats: GenerationStats

    def __iter__(self) -> Iterator[TokenEvent]: ...

    def cancel(self) -> None: ...


class EngineLike(Protocol):
    """What the server needs from :class:`octomil.engine.engine.Engine`."""

    model_id: str
    total_layers: int
    context_length: int

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]: ...

    def encode(self, text: str) -> list[int]: ...

    def generate(self, request: GenerationRequest) -> GenerationLike: ...


class ServerBusyError(Exception):
    """More than ``max_concurrency`` requests are waiting or running."""


class EngineStoppedError(Exception):
    """The worker is shut down (server stopping)."""


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


@dataclass(eq=False)
class _Job:
    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue[Any]
    cancelled: threading.Event = field(default_factory=threading.Event)
    generation: GenerationLike | None = None
    iterator: Iterator[TokenEvent] | None = None

    def send(self, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.out.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass


@dataclass(eq=False)
class _Call:
    fn: Callable[[], Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]


class GenerationStream:
    """Async view of one generation: iterate for :class:`TokenEvent`, then read ``stats``."""

    def __init__(self, client: EngineClient, job: _Job) -> None:
        self._client = client
        self._job = job
        self._finished = False

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
    """Owns the engine worker thread. Create inside a running event loop; ``close()`` to stop."""

    def __init__(
        self,
        loader: Callable[[], EngineLike],
        *,
        max_concurrency: int = 8,
        max_running: int = 4,
        on_queue_change: Callable[[int, int], None] | None = None,
    ) -> None:
        """Start the worker, which first runs ``loader()``: MLX graphs built on one thread cannot
        be evaluated on another ("There is no Stream(cpu, 0) in current thread"), so the model is
        loaded on the same thread that later generates."""
        if max_concurrency < 1 or max_running < 1:
            raise ValueError("max_concurrency and max_running must be >= 1")
        self._loader = loader
        self._engine: EngineLike | None = None
        self.load_error: BaseException | None = None
        self._loaded = threading.Event()
        self.max_concurrency = max_concurrency
        self.max_running = max_running
        self.on_queue_change = on_queue_change
        self._inbox: queue.SimpleQueue[_Job | _Call | None] = queue.SimpleQueue()
        self._waiting: deque[_Job] = deque()
        self._running: list[_Job] = []
        self._admitted = 0  # waiting + running
        self._lock = threading.Lock()
        self._stopped = threading.Event()
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
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def admitted(self) -> int:
        return self._admitted

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the engine thread (e.g. tokenizing) and await its result."""
        if self._stopped.is_set():
            raise EngineStoppedError("the engine is shutting down")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._inbox.put(_Call(lambda: fn(*args), loop, future))
        return await future

    async def generate(self, request: GenerationRequest) -> GenerationStream:
        """Admit and validate a request; raises ServerBusyError, or the engine's input errors."""
        if self._stopped.is_set():
            raise EngineStoppedError("the engine is shutting down")
        with self._lock:
            if self._admitted >= self.max_concurrency:
                raise ServerBusyError(
                    f"server busy: {self._admitted} requests in flight "
                    f"(max_concurrency={self.max_concurrency}); retry later"
                )
            self._admitted += 1
        loop = asyncio.get_running_loop()
        job = _Job(request, loop, asyncio.Queue())
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

    def close(self, timeout: float = 5.0) -> None:
        self._stopped.set()
        self._inbox.put(None)
        self._thread.join(timeout)

    def _wake(self) -> None:
        # An empty call: lets a worker blocked on the inbox notice a cancellation.
        self._inbox.put(_Call(lambda: None, None, None))  # type: ignore[arg-type]

    def _release(self) -> None:
        with self._lock:
            self._admitted -= 1

    # ------------------------------------------------------------------ worker side

    def _worker(self) -> None:
        try:
            self._engine = self._loader()
        except BaseException as exc:  # noqa: BLE001 - reported through wait_loaded()/loaded()
            self.load_error = exc
            self._stopped.set()
        finally:
            self._loaded.set()
        while not self._stopped.is_set():
            # Block only when there is nothing to step.
            block = not self._running and not self._waiting
            try:
                item = self._inbox.get(block=block)
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
            self._schedule()
            self._step_all()
        self._shutdown()

    def _accept(self, item: _Job | _Call) -> None:
        if isinstance(item, _Call):
            if item.future is None:
                return
            try:
                result = item.fn()
            except BaseException as exc:  # noqa: BLE001 - handed back to the caller
                _resolve(item.loop, item.future, error=exc)
            else:
                _resolve(item.loop, item.future, result=result)
            return
        job = item
        if job.cancelled.is_set():
            self._finish(job, None)
            return
        try:
            # Engine.generate validates before doing any work, so this is quick.
            job.generation = self.engine.generate(job.request)
        except BaseException as exc:  # noqa: BLE001 - handed back to the caller
            self._finish(job, _Failed(exc))
            return
        job.send(_Started())
        self._waiting.append(job)
        self._notify()

    def _schedule(self) -> None:
        while self._waiting and len(self._running) < self.max_running:
            self._running.append(self._waiting.popleft())
        # A cancelled job never starts.
        for job in [j for j in self._waiting if j.cancelled.is_set()]:
            self._waiting.remove(job)
            self._finish(job, _Done())
        self._notify()

    def _step_all(self) -> None:
        for job in list(self._running):
            if job.cancelled.is_set():
                self._drop(job)
                continue
            assert job.generation is not None
            if job.iterator is None:
                job.iterator = iter(job.generation)
            try:
                event = next(job.iterator, None)
            except BaseException as exc:  # noqa: BLE001 - an engine bug: fail this request only
                logger.exception("generation failed")
                self._drop(job, _Failed(exc))
                continue
            if event is None:
                self._drop(job, _Done())
                continue
            job.send(event)
            if event.finish_reason is not None:
                self._drop(job, _Done(), exhaust=True)

    def _drop(self, job: _Job, final: Any = None, *, exhaust: bool = False) -> None:
        if job in self._running:
            self._running.remove(job)
        if job.cancelled.is_set() and job.generation is not None:
            job.generation.cancel()
        if exhaust and job.iterator is not None:
            # Let the generation finish its bookkeeping (stats) after the last event.
            try:
                for _ in itertools.islice(job.iterator, 1):
                    pass
            except Exception:  # noqa: BLE001 - the answer is already complete
                logger.exception("generation failed after its last token")
        close = getattr(job.iterator, "close", None)
        if close is not None:
            close()
        self._finish(job, final if final is not None else _Done())
        self._notify()

    def _finish(self, job: _Job, final: Any) -> None:
        self._release()
        if final is not None:
            job.send(final)
        else:
            job.send(_Done())

    def _notify(self) -> None:
        if self.on_queue_change is not None:
            self.on_queue_change(len(self._waiting), len(self._running))

    def _shutdown(self) -> None:
        for job in list(self._running) + list(self._waiting):
            job.cancelled.set()
            self._drop(job, _Failed(EngineStoppedError("the server is shutting down")))
        self._waiting.clear()
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
    loop: asyncio.AbstractEventLoop,
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

    try:
        loop.call_soon_threadsafe(settle)
    except RuntimeError:
        pass
