"""One request's decoding: prefill, then sample / decode token by token, streaming TokenEvents."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import mlx.core as mx

from octomil.engine.exit_policy import ExitPolicy, entropy_nats
from octomil.engine.layer_loop import FullDepthLoop, LayerLoop, StepResult
from octomil.engine.sampling import Sampler, top_logprobs
from octomil.engine.text_stream import TextStream
from octomil.engine.types import GenerationStats, SamplingParams, TokenEvent, TokenLogprob


@dataclass(frozen=True)
class _Selection:
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
    """Iterate to decode; ``stats`` is complete when iteration ends. Iterate on one thread only."""

    def __init__(
        self,
        loop: LayerLoop | FullDepthLoop,
        prompt: list[int],
        params: SamplingParams,
        policy: ExitPolicy | None,
        tokenizer: Any,
        eos_token_ids: frozenset[int],
        vocab_size: int,
    ) -> None:
        self._loop = loop
        self._prompt = prompt
        self._params = params
        self._policy = policy
        self._tokenizer = tokenizer
        self._eos = frozenset() if params.ignore_eos else eos_token_ids
        self._sampler = Sampler(params, vocab_size)
        self._text = TextStream(tokenizer, params.stop)
        self._cancelled = threading.Event()
        self.stats = GenerationStats(total_layers=loop.num_layers, prompt_tokens=len(prompt))

    def cancel(self) -> None:
        """Thread-safe: the iteration ends before the next token, finish_reason "cancelled"."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def __iter__(self) -> Iterator[TokenEvent]:
        return self._run()

    @property
    def _runs_ahead(self) -> bool:
        """No exit check can happen: step i+1 is queued before token i is read (as mlx-lm)."""
        no_checks = self._policy is None or not self._policy.exit_layers
        return no_checks and not self._sampler.needs_history

    def _select(self, step: StepResult, history: list[int] | None) -> _Selection:
        token, logprobs = self._sampler.select(step.logits, history)
        entropy = None
        if self._policy is not None and step.entropy is None:
            entropy = entropy_nats(step.logits)  # stats only; evaluated with the token
        return _Selection(step, token, logprobs, entropy)

    def _run(self) -> Iterator[TokenEvent]:
        stats = self.stats
        start = time.perf_counter()
        full_depth = self._loop.num_layers
        ahead = self._runs_ahead
        history = list(self._prompt)
        pending = self._select(
            StepResult(self._loop.prefill(self._prompt), full_depth, None, False), history
        )
        first_token_at = None
        for i in range(self._params.max_tokens):
            if self._cancelled.is_set():
                stats.finish_reason = "cancelled"
                break
            current = pending
            if ahead and i + 1 < self._params.max_tokens:
                pending = self._select(self._loop.decode(current.token, None), None)
                mx.async_eval(pending.token, pending.logprobs)
            token = int(current.token.item())
            step = current.resolved_step()
            history.append(token)
            now = time.perf_counter()
            if first_token_at is None:
                first_token_at = now
                stats.prefill_time_s = stats.time_to_first_token_s = now - start
            stats.decode_time_s = now - first_token_at
            self._record(step)

            finish = None
            if token in self._eos:
                text, finish = self._text.finish(), "stop"
            else:
                text = self._text.add(token)
                if self._text.stopped:
                    finish = "stop"
                elif i == self._params.max_tokens - 1:
                    text += self._text.finish()
                    finish = "length"
            stats.finish_reason = finish
            yield self._event(token, text, step, current.logprobs[0], finish)
            if finish:
                return
            if not ahead:
                pending = self._select(self._loop.decode(token, self._policy), history)

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
        k = self._params.logprobs
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
        )
