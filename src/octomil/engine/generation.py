"""One request's decoding state: its prompt, KV loop, sampler, text and statistics.

A :class:`Generation` does not drive itself: the :class:`~octomil.engine.scheduler.Scheduler`
feeds its prompt in chunks, puts its next token into batched decode steps and asks it to emit
each sampled token as a :class:`TokenEvent`. Iterating a Generation runs it alone through a
scheduler of its own (the CLI, calibration, benchmarks); the server shares one scheduler among
all requests. Sampled tokens may be queued lazily (not yet evaluated) so that the next step can
be built while the previous one computes, as mlx-lm does.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import mlx.core as mx

from octomil.engine.constraint import Constraint, apply_mask
from octomil.engine.draft_model import DraftModelDrafter
from octomil.engine.exit_policy import ExitPolicy, entropy_nats
from octomil.engine.guided_drafts import DraftGuide
from octomil.engine.layer_loop import PREFILL_STEP, FullDepthLoop, LayerLoop, StepResult
from octomil.engine.layer_loop import prefill_chunks as _prefill_chunks
from octomil.engine.sampling import Sampler, top_logprobs
from octomil.engine.spec_accept import accept_sampled
from octomil.engine.speculation import SpeculativeSettings, Speculator
from octomil.engine.text_stream import TextStream
from octomil.engine.types import GenerationStats, SamplingParams, TokenEvent, TokenLogprob
from octomil.engine.verify import MAX_DRAFT_TOKENS, accepted_greedy, can_speculate, rollback


@dataclass(frozen=True)
class Selection:
    """A step's logits and its (possibly not yet evaluated) sampled token."""

    step: StepResult
    token: mx.array  # (1,)
    logprobs: mx.array  # (1, vocab)
    entropy: mx.array | None  # lazily computed entropy when the step did not measure one

    def resolved_step(self) -> StepResult:
        if self.entropy is None:
            return self.step
        return replace(self.step, entropy=float(self.entropy.item()))


class Generation:
    """One request. Iterate to decode it alone; ``stats`` is complete when iteration ends."""

    def __init__(
        self,
        loop: LayerLoop | FullDepthLoop,
        prompt: list[int],
        params: SamplingParams,
        policy: ExitPolicy | None,
        tokenizer: Any,
        eos_token_ids: frozenset[int],
        vocab_size: int,
        prefill_chunk: int = PREFILL_STEP,
        speculative: SpeculativeSettings | None = None,
        draft_model: Any = None,
        constraint: Constraint | None = None,
    ) -> None:
        """``draft_model``: the LoadedModel drafting for a ``model:NAME`` speculative mode."""
        self.loop = loop
        self.prompt = prompt
        self.params = params
        self.policy = policy
        self._tokenizer = tokenizer
        self._eos = frozenset() if params.ignore_eos else eos_token_ids
        self._sampler = Sampler(params, vocab_size, len(prompt))
        self._text = TextStream(tokenizer, params.stop)
        self._cancelled = threading.Event()
        self.prefill_chunk = prefill_chunk
        self._chunks = deque(_prefill_chunks(len(prompt), prefill_chunk))
        self._queued: deque[Selection] = deque()  # sampled, not yet emitted
        self.constraint = constraint
        self._forced: deque[int] = deque()  # the grammar's forced tokens, not yet emitted
        # The allowed tokens of the step being decoded: (vocab,), or (rows, vocab) verifying.
        self._mask: mx.array | None = None
        self._forced_end = False  # the grammar forces tokens after this step's last draft
        self._history = list(prompt)
        self._created = time.perf_counter()
        self._first_token_at: float | None = None
        self.finished = False
        self.stats = GenerationStats(total_layers=loop.num_layers, prompt_tokens=len(prompt))
        self._spec: Speculator | None = None
        self._drafts: list[int] = []  # drafted tokens riding in the current step
        if speculative is not None and speculative.enabled and can_speculate(loop):
            drafter = None if draft_model is None else DraftModelDrafter(draft_model, prompt)
            self._spec = Speculator(speculative, prompt, drafter)
            self.stats.speculative = self._spec.stats

    # ------------------------------------------------------------------ callers' side

    def cancel(self) -> None:
        """Thread-safe: decoding stops before the next token, finish_reason "cancelled"."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def __iter__(self) -> Iterator[TokenEvent]:
        from octomil.engine.scheduler import Scheduler, SchedulerConfig

        scheduler = Scheduler(SchedulerConfig(max_batch_size=1))
        scheduler.submit(self)
        while not self.finished:
            yield from (event for _, event in scheduler.step().events)

    # ------------------------------------------------------------------ scheduler's side

    @property
    def output_tokens(self) -> list[int]:
        """The tokens emitted so far."""
        return self._history[len(self.prompt) :]

    @property
    def kv_tokens(self) -> int:
        """Cache positions this request may fill: reserved when it is admitted."""
        return len(self.prompt) + self.params.max_tokens

    @property
    def prefill_remaining(self) -> int:
        return sum(c.stop - c.start for c in self._chunks)

    @property
    def next_chunk(self) -> int:
        """Tokens in the next prompt chunk (0 when the prompt is fed)."""
        return self._chunks[0].stop - self._chunks[0].start if self._chunks else 0

    def feed_chunk(self) -> int:
        """Feed the next prompt chunk into the cache; returns how many tokens it had."""
        chunk = self._chunks.popleft()
        self.loop.feed(self.prompt[chunk])
        return chunk.stop - chunk.start

    @property
    def runs_ahead(self) -> bool:
        """No exit check can happen and selection needs no token ids: the next step may be
        built from this step's unevaluated token."""
        no_checks = self.policy is None or not self.policy.exit_layers
        speculating = self._spec is not None and self._spec.active
        # A grammar's next mask depends on the token just sampled: it cannot be built ahead.
        return (
            no_checks
            and not self._sampler.needs_history
            and not speculating
            and self.constraint is None
        )

    @property
    def wants_step(self) -> bool:
        """Another decode step is needed for a token that counts (within max_tokens)."""
        return self.stats.completion_tokens + len(self._queued) < self.params.max_tokens

    @property
    def queued(self) -> int:
        return len(self._queued) + len(self._forced)

    def next_input(
        self,
    ) -> tuple[int | mx.array | list[int], ExitPolicy | None, mx.array | None]:
        """The token to decode next, the exit policy of that step (the prompt's last token,
        which yields the first answer token, always runs at full depth) and the grammar's mask
        of allowed tokens (None when unconstrained). A speculating request returns its last
        token followed by drafted tokens, verified at full depth; a constrained one drafts
        under its grammar and gets one mask per row (``octomil.engine.guided_drafts``)."""
        if self._queued:
            mask = self._grammar_mask()
            return self._queued[-1].token, self.policy, mask
        last = self._history[-1]
        first = not self.stats.completion_tokens
        exits = self.policy is not None and bool(self.policy.exit_layers)
        # The first answer token is decided at full depth, its successors by the exit policy:
        # with exit checks, a verification starts from the second token so all its rows share one.
        if self._spec is not None and not (first and exits):
            room = min(self.params.max_tokens - self.stats.completion_tokens - 1, MAX_DRAFT_TOKENS)
            if self.constraint is None:
                self._drafts = self._spec.propose(room)
                masks = None
            else:
                self._fast_forward()
                guide = DraftGuide(self.constraint, self._eos)
                self._spec.propose(room, guide)
                self._drafts, masks = guide.finish()
                self._mask, self._forced_end = masks, guide.forced_end
            if self._drafts:
                return [last, *self._drafts], None if first else self.policy, masks
            if masks is not None:
                return last, None if first else self.policy, masks[0]
        return last, None if first else self.policy, self._grammar_mask()

    def _grammar_mask(self) -> mx.array | None:
        """The allowed tokens of this step (after fast-forwarding), None when unconstrained."""
        if self.constraint is None:
            return None
        self._fast_forward()
        self._mask = self.constraint.mask()
        return self._mask

    def _fast_forward(self) -> None:
        """Feed emitted forced tokens (all but the newest, which is this step's input) into the
        cache as one chunk at full depth: one pass for the run instead of one step per token."""
        behind = self._history[self.loop.position : len(self._history) - 1]
        if behind:
            self.loop.flush()  # pending catch-up rows first, so the cache stays in order
            self.loop.feed(behind)

    def select(self, step: StepResult) -> Selection:
        """Sample lazily from a step's logits and queue the token for emission."""
        if self._drafts:
            return self._select_verified(step)
        history = self._history if self._sampler.needs_history else None
        logits = step.logits
        if self._mask is not None:  # already masked by the layer loop; a no-op then
            logits = apply_mask(logits, self._mask)
            step = replace(step, logits=logits)
        token, logprobs = self._sampler.select(logits, history)
        entropy = None
        if self.policy is not None and step.entropy is None:
            entropy = entropy_nats(step.logits)  # stats only; evaluated with the token
        selection = Selection(step, token, logprobs, entropy)
        self._queued.append(selection)
        return selection

    def _select_verified(self, step: StepResult) -> Selection:
        """Keep the longest accepted prefix of the drafts plus the token that follows it; queue
        them all and trim the rejected rows from the cache (``octomil.engine.verify``)."""
        assert self._spec is not None
        drafts, self._drafts = self._drafts, []
        sampler = self._sampler
        history = self._history if sampler.needs_history else None
        logits = step.logits
        if self._mask is not None:  # each row's own mask; already applied by the layer loop
            logits = apply_mask(logits, self._mask)
        targets, rows = [], []
        for j in range(len(drafts) + 1):
            seen = None if history is None else history + drafts[:j]
            targets.append(sampler.target(logits[j : j + 1], seen))
            rows.append(targets[-1][1])
        if targets[0][0] is None:  # greedy: the rows' argmax, one sync
            chosen = mx.argmax(mx.concatenate(rows, axis=0), axis=-1).tolist()
            m = accepted_greedy(chosen, drafts)
            tokens = [*drafts[:m], chosen[m]]
        else:
            sample_logits = mx.concatenate([t for t, _ in targets], axis=0)  # type: ignore[misc]
            m, follow = accept_sampled(sample_logits, drafts, sampler.next_key())
            tokens = [*drafts[:m], follow]
        rollback(self.loop, len(drafts) - m)
        if step.row_pending:  # exits decided inside the verification (``verify``)
            self.loop.virtual_pending = step.row_pending[m]  # type: ignore[union-attr]
        if self._forced_end and m == len(drafts):
            # The grammar forces what follows the drafts: plain decoding emits those tokens
            # without the model (and flushes its pending rows), not the bonus row's choice.
            tokens.pop()
            self.loop.virtual_pending = 0  # type: ignore[union-attr]
        self._forced_end = False
        self._spec.observe(len(drafts), m)
        selection = None
        for j, token in enumerate(tokens):
            row = replace(step, logits=logits[j : j + 1], entropy=None)
            selection = Selection(row, mx.array([token]), rows[j], None)
            self._queued.append(selection)
        assert selection is not None
        return selection

    def emit(self) -> TokenEvent:
        """Read the oldest queued token (evaluating it if needed) and turn it into an event."""
        if self._forced:
            return self._emit_forced(self._forced.popleft())
        current = self._queued.popleft()
        token = int(current.token.item())
        step = current.resolved_step()
        self._history.append(token)
        if self._spec is not None:
            self._spec.extend([token])
        now = time.perf_counter()
        stats = self.stats
        if self._first_token_at is None:
            self._first_token_at = now
            stats.prefill_time_s = stats.time_to_first_token_s = now - self._created
        stats.decode_time_s = now - self._first_token_at
        self._record(step)
        text, finish = self._advance(token)
        return self._event(token, text, step, current.logprobs[0], finish)

    def _advance(self, token: int) -> tuple[str, str | None]:
        """The text ``token`` adds and the finish reason it causes; steps the grammar and
        queues the forced tokens that follow it."""
        stats = self.stats
        grammar = self.constraint
        if grammar is not None and token not in self._eos:
            grammar.accept(token)
        finish = None
        if token in self._eos:
            text, finish = self._text.finish(), "stop"
        else:
            text = self._text.add(token)
            if self._text.stopped or (grammar is not None and (grammar.done or grammar.failed)):
                text += self._text.finish() if not self._text.stopped else ""
                finish = "stop"
            elif stats.completion_tokens == self.params.max_tokens:
                text += self._text.finish()
                finish = "length"
        stats.finish_reason = finish
        if finish:
            self.finished = True
            self._queued.clear()
            self._forced.clear()
        elif grammar is not None and not self._forced:
            room = self.params.max_tokens - stats.completion_tokens - len(self._queued)
            self._forced.extend(grammar.forced()[: max(room, 0)])
        return text, finish

    def _emit_forced(self, token: int) -> TokenEvent:
        """A token the grammar forces: no model pass (it reaches the cache by fast-forward)."""
        self._history.append(token)
        if self._spec is not None:
            self._spec.extend([token])
        self.stats.completion_tokens += 1
        self.stats.forced_tokens += 1
        self.stats.decode_time_s = time.perf_counter() - (self._first_token_at or self._created)
        text, finish = self._advance(token)
        lp = TokenLogprob(token, self._tokenizer.decode([token]), 0.0)
        return TokenEvent(
            token_id=token,
            text=text,
            layers_used=0,
            entropy=None,
            exited_early=False,
            logprob=lp if self.params.logprobs is not None else None,
            finish_reason=finish,
            forced=True,
        )

    def end_cancelled(self) -> None:
        self.stats.finish_reason = "cancelled"
        self.finished = True
        self._queued.clear()

    def release(self) -> None:
        """Free what only decoding needs (KV cache, pending rows, mask, drafts) once the request
        has ended; ``stats`` and the position stay. A server's reference cycles (an exception's
        traceback holding the stream that holds this) can keep the object until Python's cyclic
        collector runs, and the KV arrays must not wait that long: a 20-minute soak ended with
        MLX's memory 56 MB above its start while idle (60 requests with the collector paused:
        79 MB of ended requests' caches)."""
        self.loop.cache = []
        self.loop.pending = []
        self._queued.clear()
        self._mask = None
        self._drafts = []
        if self._spec is not None:
            self._spec.release()

    def _record(self, step: StepResult) -> None:
        s = self.stats
        s.completion_tokens += 1
        s.layers_used.append(step.depth)
        s.early_exit_tokens += int(step.exited)
        if step.entropy is not None:
            s.entropies.append(step.entropy)

    def _event(
        self, token: int, text: str, step: StepResult, logprobs: Any, finish: str | None
    ) -> TokenEvent:
        chosen, alternatives = None, ()
        k = self.params.logprobs
        if k is not None:
            decode = self._tokenizer.decode
            chosen = TokenLogprob(token, decode([token]), float(logprobs[token].item()))
            alternatives = tuple(
                TokenLogprob(t, decode([t]), lp) for t, lp in top_logprobs(logprobs, k)
            )
        return TokenEvent(
            token_id=token,
            text=text,
            layers_used=step.depth,
            entropy=step.entropy,
            exited_early=step.exited,
            logprob=chosen,
            top_logprobs=alternatives,
            finish_reason=finish,
            shadow=self._shadow_results(),
        )

    def _shadow_results(self) -> tuple[tuple[int, bool], ...]:
        book = getattr(self.loop, "shadow", None)  # FullDepthLoop has none
        return tuple((r.exit_layer, r.agreed) for r in book.drain()) if book else ()
