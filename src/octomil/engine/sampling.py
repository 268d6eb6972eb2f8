"""Token selection: logit bias, penalties (repetition; OpenAI's frequency and presence),
temperature, top-k / top-p, seeded sampling, logprobs.

Each request owns its PRNG key (split once per token), so seeded results do not depend on other
requests decoding on the same engine thread.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx
from mlx_lm.sample_utils import apply_top_k, apply_top_p, make_repetition_penalty

from octomil.engine.types import SamplingParams
from octomil.kernels import decode

# Tokens of recent context the repetition penalty looks at (mlx-lm's default).
REPETITION_CONTEXT = 20


@dataclass
class Choice:
    token: int
    logprobs: mx.array  # (vocab,) log-softmax of the processed logits, before temperature


class Sampler:
    """Picks one token from the logits of one step, for one request."""

    def __init__(self, params: SamplingParams, vocab_size: int, prompt_len: int = 0) -> None:
        """``prompt_len``: where the output starts in the history ``select`` is given (OpenAI's
        frequency and presence penalties count output tokens only)."""
        self.params = params
        self._prompt_len = prompt_len
        self._vocab = vocab_size
        self._bias = None
        if params.logit_bias:
            ids, values = zip(*params.logit_bias, strict=True)
            bias = mx.zeros((vocab_size,))
            self._bias = bias.at[mx.array(ids)].add(mx.array(values, dtype=mx.float32))
        self._counted = params.frequency_penalty != 0.0 or params.presence_penalty != 0.0
        self._key = mx.random.key(params.seed if params.seed is not None else _entropy_seed())
        self._penalty = (
            make_repetition_penalty(params.repetition_penalty, REPETITION_CONTEXT)
            if params.repetition_penalty != 1.0
            else None
        )
        self._top_k = params.top_k if 0 < params.top_k < vocab_size else 0

    @property
    def needs_history(self) -> bool:
        """True when selection depends on earlier tokens as ints (so it cannot run ahead lazily)."""
        return self._penalty is not None or self._counted

    def select(self, logits: mx.array, history: list[int] | None) -> tuple[mx.array, mx.array]:
        """Lazily: (token (1,), log-softmax (1, vocab)); nothing is evaluated here."""
        sample_logits, logprobs = self.target(logits, history)
        if sample_logits is None:
            return mx.argmax(logprobs, axis=-1), logprobs
        return mx.random.categorical(sample_logits, key=self.next_key()), logprobs

    def target(
        self, logits: mx.array, history: list[int] | None
    ) -> tuple[mx.array | None, mx.array]:
        """(logits whose softmax is the distribution a token is drawn from, None when greedy;
        log-softmax of the processed logits)."""
        if self._bias is not None:
            logits = logits + self._bias.astype(logits.dtype)
        if self._penalty is not None and history:
            logits = self._penalty(mx.array(history[-REPETITION_CONTEXT:]), logits)
        output = history[self._prompt_len :] if self._counted and history else []
        if output:
            p = self.params
            counts = mx.zeros((self._vocab,)).at[mx.array(output)].add(1.0)
            penalty = p.frequency_penalty * counts + p.presence_penalty * (counts > 0)
            logits = logits - penalty.astype(logits.dtype)
        logprobs = logits - decode.logsumexp(logits)
        p = self.params
        if p.temperature <= 0.0:
            return None, logprobs
        filtered = logprobs
        if self._top_k:
            filtered = apply_top_k(filtered, self._top_k)
        if 0.0 < p.top_p < 1.0:
            filtered = apply_top_p(filtered, p.top_p)
        return filtered * (1.0 / p.temperature), logprobs

    def next_key(self) -> mx.array:
        """A fresh PRNG key from this request's stream (one split per token or verification)."""
        self._key, sub = mx.random.split(self._key)
        return sub

    def __call__(self, logits: mx.array, history: list[int]) -> Choice:
        """``logits`` (1, vocab); ``history`` is prompt + generated token ids so far."""
        token, logprobs = self.select(logits, history)
        return Choice(int(token.item()), logprobs[0])


def _entropy_seed() -> int:
    import secrets

    return secrets.randbits(62)


def top_logprobs(logprobs: mx.array, k: int) -> list[tuple[int, float]]:
    """The ``k`` most likely tokens with their log-probabilities, most likely first; tokens of
    probability 0 (masked by a grammar: -inf, which JSON cannot carry) are left out."""
    if k <= 0:
        return []
    idx = mx.argpartition(-logprobs, kth=k - 1)[:k]
    vals = logprobs[idx]
    pairs = sorted(zip(idx.tolist(), vals.tolist(), strict=True), key=lambda p: -p[1])
    return [(int(i), float(v)) for i, v in pairs if v != -math.inf]
