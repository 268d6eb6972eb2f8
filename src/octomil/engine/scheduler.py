"""Continuous (iteration-level) batching: which sequences share each step, and prefill budgets.

Decoding on this CPU is bound by memory bandwidth, so one read of the weights should serve as many
rows as possible. Each :meth:`Scheduler.step`:

1. drops cancelled requests (between any two prefill chunks or tokens);
2. admits waiting requests in arrival order while their KV positions (prompt + max_tokens) fit
   the budget (``max_kv_tokens``); a request that could never fit is refused at submission;
3. feeds prompt chunks, round robin among the prefilling requests, as many whole chunks as fit
   one chunk's worth of tokens (at least one): a long prompt never stalls the running streams for
   longer than one chunk, a short prompt arriving behind it waits at most one chunk per prompt
   ahead of it, and many short prompts arriving together are read in one step;
4. decodes one token for up to ``max_batch_size`` sequences in one batched pass
   (``layer_loop.decode_batch``): every product reads the weights once for all of them.

Invariant: a sequence's tokens do not depend on its neighbours. Its prompt is cut into chunks by
its own length only; its rows in a batched step see the same products and the same attention over
its own cache as alone (``engine.ragged``); its sampler has its own PRNG key. So a request served
in a batch gives the tokens it gives alone (tests check this token for token).

When no sequence of the batch can exit early or needs token ids to sample, the next step is built
from the current step's unevaluated tokens and the tokens are read one step later (run-ahead, as
mlx-lm decodes); otherwise the step is evaluated before its tokens are read.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import mlx.core as mx

from octomil.engine.errors import PromptTooLongError
from octomil.engine.generation import Generation
from octomil.engine.layer_loop import (
    EXIT_RULES,
    DecodeInput,
    LayerLoop,
    StepResult,
    decode_batch,
)
from octomil.engine.types import TokenEvent


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch_size: int = 16
    max_kv_tokens: int | None = None  # None: no budget beyond each request's context length
    exit_rule: str = "row"  # see layer_loop.EXIT_RULES

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        if self.max_kv_tokens is not None and self.max_kv_tokens < 1:
            raise ValueError("max_kv_tokens must be >= 1")
        if self.exit_rule not in EXIT_RULES:
            raise ValueError(f"exit_rule must be one of {EXIT_RULES}")


@dataclass
class StepOutput:
    """What one step produced: events in order, requests that ended (done or cancelled)."""

    events: list[tuple[Generation, TokenEvent]] = field(default_factory=list)
    finished: list[Generation] = field(default_factory=list)
    batch_size: int = 0  # sequences decoded in this step
    prefill_tokens: int = 0  # prompt tokens fed in this step


class Scheduler:
    """Owns the running requests of one engine. Not thread-safe: call from the engine thread."""

    def __init__(self, config: SchedulerConfig | None = None) -> None:
        self.config = config or SchedulerConfig()
        self._waiting: deque[Generation] = deque()  # not admitted: no KV reserved yet
        self._prefilling: deque[Generation] = deque()
        self._ready: deque[Generation] = deque()  # prompt fed, waiting for a batch slot
        self._decoding: list[Generation] = []
        self.kv_tokens_reserved = 0

    # ------------------------------------------------------------------ state

    @property
    def waiting(self) -> int:
        """Requests not decoding yet (queued for KV, prefilling, or for a batch slot)."""
        return len(self._waiting) + len(self._prefilling) + len(self._ready)

    @property
    def running(self) -> int:
        return len(self._decoding)

    @property
    def idle(self) -> bool:
        return not (self._waiting or self._prefilling or self._ready or self._decoding)

    # ------------------------------------------------------------------ requests

    def submit(self, generation: Generation) -> None:
        """Queue a request; raises PromptTooLongError when it could never fit the KV budget."""
        budget = self.config.max_kv_tokens
        if budget is not None and generation.kv_tokens > budget:
            raise PromptTooLongError(
                f"this request needs {generation.kv_tokens} KV cache positions (prompt + "
                f"max_tokens) but the server's KV budget is {budget} (--max-kv-tokens); reduce "
                "the prompt or max_tokens"
            )
        self._waiting.append(generation)

    def step(self) -> StepOutput:
        out = StepOutput()
        self._drop_cancelled(out)
        self._admit()
        self._prefill(out)
        while self._ready and len(self._decoding) < self.config.max_batch_size:
            self._decoding.append(self._ready.popleft())
        if self._decoding:
            self._decode(out)
        return out

    def _prefill(self, out: StepOutput) -> None:
        """Feed whole prompt chunks, round robin, while they fit one chunk's worth of tokens
        (at least one chunk a step): many short prompts start together, a long one goes on."""
        budget = self._prefilling[0].prefill_chunk if self._prefilling else 0
        for _ in range(len(self._prefilling)):
            gen = self._prefilling[0]
            if out.prefill_tokens and out.prefill_tokens + gen.next_chunk > budget:
                break
            self._prefilling.popleft()
            out.prefill_tokens += gen.feed_chunk()
            (self._prefilling if gen.prefill_remaining else self._ready).append(gen)

    def _drop_cancelled(self, out: StepOutput) -> None:
        for queue in (self._waiting, self._prefilling, self._ready):
            for gen in [g for g in queue if g.cancelled]:
                queue.remove(gen)
                self._end(gen, out, cancelled=True, reserved=queue is not self._waiting)
        for gen in [g for g in self._decoding if g.cancelled]:
            self._decoding.remove(gen)
            self._end(gen, out, cancelled=True)

    def _admit(self) -> None:
        budget = self.config.max_kv_tokens
        while self._waiting:
            gen = self._waiting[0]
            if budget is not None and self.kv_tokens_reserved + gen.kv_tokens > budget:
                return  # first come, first served: later requests do not overtake it
            self._waiting.popleft()
            self.kv_tokens_reserved += gen.kv_tokens
            (self._prefilling if gen.prefill_remaining else self._ready).append(gen)

    def _end(
        self, gen: Generation, out: StepOutput, *, cancelled: bool = False, reserved: bool = True
    ) -> None:
        if cancelled:
            gen.end_cancelled()
        if reserved:
            self.kv_tokens_reserved -= gen.kv_tokens
        gen.release()  # its KV memory goes now, whoever still holds the Generation
        out.finished.append(gen)

    # ------------------------------------------------------------------ decoding

    def _decode(self, out: StepOutput) -> None:
        batch = self._decoding
        ahead = all(g.runs_ahead for g in batch)
        if not ahead:  # tokens queued by an earlier run-ahead step are read first
            for gen in list(batch):
                while gen.queued and not gen.finished:
                    self._emit(gen, out)
            batch = self._decoding
        stepping = [g for g in batch if g.wants_step]
        out.batch_size = len(stepping)
        if stepping:
            inputs = [DecodeInput(g.loop, *g.next_input()) for g in stepping]
            results = self._run(inputs)
            selections = [g.select(r) for g, r in zip(stepping, results, strict=True)]
            if ahead:
                mx.async_eval([a for s in selections for a in (s.token, s.logprobs)])
        for gen in list(self._decoding):
            # Run-ahead: emit the previous step's token, keep this step's queued.
            keep = 1 if ahead and gen in stepping else 0
            while gen.queued > keep and not gen.finished:
                self._emit(gen, out)

    def _run(self, inputs: list[DecodeInput]) -> list[StepResult]:
        loops = [i.loop for i in inputs]
        if all(isinstance(loop, LayerLoop) for loop in loops):
            anatomy = loops[0].anatomy  # type: ignore[union-attr]
            return decode_batch(anatomy, inputs, exit_rule=self.config.exit_rule)
        # Families without an anatomy run one sequence at a time through the model's own pass.
        return [i.loop.decode(i.token, None) for i in inputs]

    def _emit(self, gen: Generation, out: StepOutput) -> None:
        out.events.append((gen, gen.emit()))
        if gen.finished:
            self._decoding.remove(gen)
            self._end(gen, out)
