"""Speculation under a grammar: drafts the grammar allows, and the mask of every verification row.

A constrained request that speculates walks its grammar through the drafted tokens before the
step (:class:`DraftGuide`): a lookup draft is cut at its first token the grammar does not allow
(:meth:`DraftGuide.take`), a draft model argmaxes under the current row's mask
(:meth:`DraftGuide.mask`, :meth:`DraftGuide.push`). Each accepted draft yields the mask of the
next row, so verification row i is masked with the grammar's state after drafts 0..i-1 — at the
last layer and at every exit check inside the verification, as a one-token step is. Then the
grammar is rolled back (:meth:`DraftGuide.finish`): tokens reach it when they are emitted, as
without speculation.

Forced tokens: decoding without speculation emits the tokens a grammar forces without a model
pass (``Generation._emit_forced``). So a draft stops at the first state that has forced tokens
(``forced_end``); if every draft is accepted, the verification's bonus row is discarded (its
token would be the model's, where plain decoding emits the forced ones) and the forced tokens
follow as usual. Invariant: a greedy constrained request emits the same tokens with and without
speculation, forced ones included.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from octomil.engine.constraint import Constraint, bits_to_masks
from octomil.engine.verify import MAX_DRAFT_TOKENS


class DraftGuide:
    """One step's walk of ``constraint`` through drafted tokens; ``eos`` ends no draft (a draft
    stops before it: the model's own row decides whether to end)."""

    def __init__(self, constraint: Constraint, eos: frozenset[int]) -> None:
        self._grammar = constraint
        self._eos = eos
        words = (constraint.vocab_size + 31) // 32
        self._bits = np.zeros((MAX_DRAFT_TOKENS + 1, words), dtype=np.int32)
        constraint.mask_bits(self._bits[0])
        self.tokens: list[int] = []
        self.forced_end = False  # the state after the last draft has forced tokens
        self._finished = False

    @property
    def open(self) -> bool:
        """Another draft may follow the ones taken."""
        return (
            not self.forced_end
            and len(self.tokens) < MAX_DRAFT_TOKENS
            and not self._grammar.done
            and not self._finished
        )

    def allows(self, token: int) -> bool:
        """The grammar allows ``token`` after the drafts taken so far (EOS never as a draft)."""
        if token in self._eos or not 0 <= token < self._grammar.vocab_size:
            return False
        word = self._bits[len(self.tokens), token >> 5]
        return bool((int(word) >> (token & 31)) & 1)

    def mask(self) -> mx.array:
        """(vocab,) bool: the tokens allowed after the drafts taken so far."""
        row = len(self.tokens)
        return bits_to_masks(self._bits[row : row + 1], self._grammar.vocab_size)[0]

    def push(self, token: int) -> bool:
        """Take ``token`` as the next draft; False (nothing taken) when the guide is closed or
        the grammar does not allow it."""
        if not self.open or not self.allows(token):
            return False
        accepted = self._grammar.accept(token)
        assert accepted, "a token the mask allows is accepted"
        self.tokens.append(token)
        self._grammar.mask_bits(self._bits[len(self.tokens)])
        self.forced_end = bool(self._grammar.forced())
        return True

    def take(self, drafts: list[int]) -> list[int]:
        """Keep the longest prefix of ``drafts`` the grammar allows (up to a forced state)."""
        for token in drafts:
            if not self.push(token):
                break
        return self.tokens

    def finish(self) -> tuple[list[int], mx.array]:
        """(the drafts, the (drafts + 1, vocab) masks of the verification's rows); the grammar
        is back in the state it had before the walk."""
        self._grammar.rollback(len(self.tokens))
        self._finished = True
        rows = len(self.tokens) + 1
        return list(self.tokens), bits_to_masks(self._bits[:rows], self._grammar.vocab_size)
