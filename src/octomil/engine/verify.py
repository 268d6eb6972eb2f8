"""Verification of drafted tokens: feed them as rows, keep the accepted prefix, forget the rest.

A speculating sequence feeds its last token and K drafted tokens as K+1 consecutive rows of one
decode step (``layer_loop.decode_batch``, a segment of K+1 rows beside its neighbours' rows), at
full depth, and gets logits for every row. Row j's logits are bit-identical to what a one-token
decode step would give after the first j drafts: the few-row products compute each row
independently of the others (``octomil.blas``), and attention over K+1 rows with the causal mask
was checked to give the same bits as K+1 one-row steps (``tests/unit/test_speculative.py``).

Invariant: after a verification that accepted m of K drafts, every layer's cache holds exactly
the tokens fed so far (the last token and the m accepted drafts), as a full-depth prefill of
those tokens would: the K - m rejected rows are trimmed from every layer's cache
(:func:`rollback`), and ``loop.position`` counts the kept tokens only. A trimmed position is
overwritten by the next token fed there. Caches that cannot be trimmed (rotating sliding-window
caches) never speculate (:func:`can_speculate`).
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import KVCache

from octomil.engine.catch_up import MAX_PENDING_ROWS

# A verification segment (catch-up rows + last token + drafts) must fit one few-row product
# (``route.max_rows()``, 32) to stay batch invariant.
MAX_DRAFT_TOKENS = 12
assert MAX_PENDING_ROWS + 1 + MAX_DRAFT_TOKENS <= 32


def can_speculate(loop: Any) -> bool:
    """Every layer's cache can drop positions exactly (plain KV caches, no rotating windows)."""
    return all(type(c) is KVCache for c in loop.cache)


def rollback(loop: Any, rows: int) -> None:
    """Forget the last ``rows`` fed positions in every layer's cache (rejected drafts)."""
    if rows <= 0:
        return
    assert not loop.pending, "a verifying step leaves no pending rows"
    for c in loop.cache:
        c.trim(rows)
    loop.position -= rows


def exits_in_verification(
    logits: mx.array, exits: dict[int, Any], pending: int
) -> tuple[mx.array, tuple[int, ...]]:
    """A verification under an exit policy decides each row as a one-token step would: row j
    exits at the first check whose decision says so (``exits[j]``, from the same hidden state
    and head), unless as many rows as ``MAX_PENDING_ROWS`` are pending before it (``pending``
    at the start, +1 per exited row, 0 after a full-depth row). Returns the rows' logits (an
    exited row's from its exit) and the pending count after each row; every row still ran to
    full depth, so the cache is complete (``LayerLoop.virtual_pending`` keeps the count)."""
    rows, after = [], []
    for j in range(logits.shape[0]):
        decision = exits.get(j)
        if decision is not None and pending < MAX_PENDING_ROWS:
            rows.append(decision.logits)
            pending += 1
        else:
            rows.append(logits[j : j + 1])
            pending = 0
        after.append(pending)
    return mx.concatenate(rows, axis=0), tuple(after)


def accepted_greedy(targets: list[int], drafts: list[int]) -> int:
    """How many drafts match the model's own choices (``targets[j]`` follows ``drafts[:j]``)."""
    m = 0
    while m < len(drafts) and drafts[m] == targets[m]:
        m += 1
    return m
