"""The layer loop: prefill at full depth, then decode one token at a time with optional early exit.

Decoding runs the model's pieces (embedding, layers, final norm, shared head; see
``octomil.models.anatomy``) itself so that it can stop after any candidate exit layer. A token that
exits leaves a pending row (``octomil.engine.catch_up``) that rides along with the next token
through the layers it skipped, so the KV cache stays exactly the full-depth cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import make_prompt_cache

from octomil.engine.catch_up import MAX_PENDING_ROWS, PendingRow, rows_joining
from octomil.engine.exit_policy import ExitPolicy, entropy_nats
from octomil.models.anatomy import Anatomy

# Same chunking as mlx_lm.generate_step, so full-depth prefill matches stock mlx-lm bit for bit.
PREFILL_STEP = 2048


@dataclass(frozen=True)
class StepResult:
    logits: mx.array  # (1, vocab), for the token just decoded
    depth: int  # layers this token ran (1-based); == total layers at full depth
    entropy: float | None  # entropy (nats) of the distribution it was emitted from, when measured
    exited: bool


class LayerLoop:
    """Runs one sequence through ``anatomy``'s layers, owning its KV cache and pending rows."""

    def __init__(self, anatomy: Anatomy, model: Any) -> None:
        self.anatomy = anatomy
        self.cache = make_prompt_cache(model)
        self.pending: list[PendingRow] = []
        self.position = 0  # number of tokens fed so far

    @property
    def num_layers(self) -> int:
        return self.anatomy.num_layers

    def _mask(self, h: mx.array, layer: int) -> Any:
        window = self.anatomy.sliding_window if self.anatomy.is_sliding(layer) else None
        return create_attention_mask(
            h, self.cache[layer], window_size=window, return_array=self.anatomy.mask_as_array
        )

    def _run(self, h: mx.array, start: int, stop: int) -> mx.array:
        for i in range(start, stop):
            h = self.anatomy.layers[i](h, self._mask(h, i), self.cache[i])
        return h

    def prefill(self, tokens: list[int]) -> mx.array:
        """Feed the prompt at full depth; return the logits (1, vocab) predicting the next token."""
        assert tokens, "empty prompt"
        assert not self.pending, "prefill after decode with pending rows is not supported"
        prompt = mx.array(tokens)
        while prompt.size > 1:
            n = min(PREFILL_STEP, prompt.size - 1)
            self._run(self.anatomy.embed(prompt[None, :n]), 0, self.num_layers)
            mx.eval([c.state for c in self.cache])
            prompt = prompt[n:]
        h = self._run(self.anatomy.embed(prompt[None]), 0, self.num_layers)
        self.position += len(tokens)
        return self.anatomy.logits(h[:, -1, :])

    def decode(self, token: int | mx.array, policy: ExitPolicy | None) -> StepResult:
        """Feed one generated token; stop after the first candidate layer whose entropy passes.

        ``token`` may be a not-yet-evaluated (1,) array, so the next step can be queued early.
        """
        position = self.position
        self.position += 1
        can_exit = policy is not None and len(self.pending) < MAX_PENDING_ROWS
        waiting = list(self.pending)
        rows: list[int] = [position]  # positions of the rows in ``h``, ascending
        h = self.anatomy.embed(_as_input(token))
        last_entropy: float | None = None
        for i in range(self.num_layers):
            joining = rows_joining(waiting, i)
            if joining:
                h, rows = _merge_rows(h, rows, joining)
                waiting = [r for r in waiting if r.start_layer != i]
            h = self.anatomy.layers[i](h, self._mask(h, i), self.cache[i])
            depth = i + 1
            if can_exit and policy.checks_after(depth):
                decision = policy.decide(self.anatomy, h[:, -1, :], depth)
                if decision.entropy is not None:
                    last_entropy = decision.entropy
                if decision.exit:
                    assert decision.logits is not None
                    self.pending = waiting + [
                        PendingRow(pos, h[:, k : k + 1, :], depth) for k, pos in enumerate(rows)
                    ]
                    return StepResult(decision.logits, depth, last_entropy, exited=True)
        self.pending = []
        logits = self.anatomy.logits(h[:, -1, :])
        if policy is not None:
            last_entropy = entropy_nats(logits).item()
        return StepResult(logits, self.num_layers, last_entropy, exited=False)

    def flush(self) -> None:
        """Run every pending row to full depth, so the cache is complete for all fed tokens."""
        while self.pending:
            first = min(r.start_layer for r in self.pending)
            rows: list[int] = []
            h = None
            for i in range(first, self.num_layers):
                joining = rows_joining(self.pending, i)
                if joining:
                    h, rows = _merge_rows(h, rows, joining)
                h = self.anatomy.layers[i](h, self._mask(h, i), self.cache[i])
            self.pending = []
        mx.eval([c.state for c in self.cache])


def _as_input(token: int | mx.array) -> mx.array:
    """One token id as the (1, 1) input of a decode step."""
    return token.reshape(1, 1) if isinstance(token, mx.array) else mx.array([[token]])


def _merge_rows(
    h: mx.array | None, rows: list[int], joining: list[PendingRow]
) -> tuple[mx.array, list[int]]:
    """Insert pending rows into ``h`` (1, R, D) keeping rows in position order."""
    pieces = [(pos, h[:, k : k + 1, :]) for k, pos in enumerate(rows)] if h is not None else []
    pieces += [(r.position, r.hidden) for r in joining]
    pieces.sort(key=lambda p: p[0])
    return mx.concatenate([p for _, p in pieces], axis=1), [pos for pos, _ in pieces]


class FullDepthLoop:
    """Fallback for model families without an anatomy: the model's own forward pass."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.cache = make_prompt_cache(model)
        self.position = 0
        self.pending: list[PendingRow] = []

    @property
    def num_layers(self) -> int:
        return len(self.model.layers)

    def prefill(self, tokens: list[int]) -> mx.array:
        prompt = mx.array(tokens)
        while prompt.size > 1:
            n = min(PREFILL_STEP, prompt.size - 1)
            self.model(prompt[None, :n], cache=self.cache)
            mx.eval([c.state for c in self.cache])
            prompt = prompt[n:]
        self.position += len(tokens)
        return self.model(prompt[None], cache=self.cache)[:, -1, :]

    def decode(self, token: int | mx.array, policy: ExitPolicy | None) -> StepResult:
        self.position += 1
        logits = self.model(_as_input(token), cache=self.cache)[:, -1, :]
        return StepResult(logits, self.num_layers, None, exited=False)

    def flush(self) -> None:
        mx.eval([c.state for c in self.cache])
