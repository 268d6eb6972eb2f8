"""Deferred catch-up: how a token that exited early still gets exact K/V in the layers it skipped.

A token that leaves after layer ``e`` has no keys/values in layers ``e..N-1``; later tokens must
not attend to those layers until they are filled. Instead of approximating them (copying the exited
state, CALM-style propagation), we keep the token's hidden state at depth ``e`` as a *pending row*.
In the next decode step the pending row joins the new token at layer ``e`` as an extra row of the
same matrix product, so it runs through exactly the layers it skipped, in position order, and
writes exactly the K/V full-depth decoding would have written. On this CPU a second row costs
little more than one (matrix-vector products are memory-bound), and the cache is *exactly* the
full-depth cache, which tests check against a full-depth prefill of the same tokens.

Invariant: in every layer the cache holds a contiguous prefix of positions; the positions missing
from layer ``j`` are exactly the pending rows with ``start_layer <= j``.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

# More pending rows than this and the next token is decoded at full depth, which flushes them all.
MAX_PENDING_ROWS = 4


@dataclass(frozen=True)
class PendingRow:
    position: int
    hidden: mx.array  # (1, 1, D): the token's hidden state entering ``start_layer``
    start_layer: int  # 0-based index of the first layer this token has not run


def rows_joining(pending: list[PendingRow], layer: int) -> list[PendingRow]:
    """Pending rows whose first missing layer is ``layer``, in position order."""
    return sorted((r for r in pending if r.start_layer == layer), key=lambda r: r.position)
