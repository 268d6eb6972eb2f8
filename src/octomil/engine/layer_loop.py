"""The layer loop: prefill at full depth, then decode one token at a time with optional early exit.

Decoding runs the model's pieces (embedding, layers, final norm, shared head; see
``octomil.models.anatomy``) itself so that it can stop after any candidate exit layer. A token that
exits leaves a pending row (``octomil.engine.catch_up``) that rides along with the next token
through the layers it skipped, so the KV cache stays exactly the full-depth cache.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import KVCache, make_prompt_cache

from octomil.blas import route
from octomil.engine.catch_up import MAX_PENDING_ROWS, PendingRow, rows_joining
from octomil.engine.exit_policy import ExitDecision, ExitPolicy, entropy_nats
from octomil.engine.ragged import Segment, run_layer
from octomil.engine.shadow import ShadowBook
from octomil.engine.verify import exits_in_verification
from octomil.models.anatomy import Anatomy

# Same chunking as mlx_lm.generate_step, so full-depth prefill matches stock mlx-lm bit for bit.
PREFILL_STEP = 2048


def prefill_chunks(prompt_len: int, chunk: int) -> list[slice]:
    """The chunks a prompt's tokens are fed in, all but the last token (decoded as a step).

    Depends only on the prompt length and the chunk size, never on other sequences, so a prompt is
    cut the same way whether it is served alone or beside others (as mlx-lm cuts it: 2048).
    """
    return [slice(a, min(a + chunk, prompt_len - 1)) for a in range(0, prompt_len - 1, chunk)]


@dataclass(frozen=True)
class StepResult:
    logits: mx.array  # (rows, vocab): one row per token fed (several when verifying a draft)
    depth: int  # layers this token ran (1-based); == total layers at full depth
    entropy: float | None  # entropy (nats) of the distribution it was emitted from, when measured
    exited: bool
    # A verification with an exit policy: per row, the pending-row count after it as decoding
    # without speculation would have it (``octomil.engine.verify``).
    row_pending: tuple[int, ...] = ()


class LayerLoop:
    """Runs one sequence through ``anatomy``'s layers, owning its KV cache and pending rows."""

    def __init__(self, anatomy: Anatomy, model: Any) -> None:
        self.anatomy = anatomy
        self.cache = make_prompt_cache(model)
        self.pending: list[PendingRow] = []
        self.position = 0  # number of tokens fed so far
        self.shadow = ShadowBook()
        # Exited rows a verification already ran to full depth that decoding without
        # speculation would still hold pending: they count against MAX_PENDING_ROWS.
        self.virtual_pending = 0

    @property
    def num_layers(self) -> int:
        return self.anatomy.num_layers

    def _mask(self, h: mx.array, layer: int) -> Any:
        return self.mask(h.shape[1], layer)

    def mask(self, rows: int, layer: int) -> Any:
        """Attention mask for ``rows`` new consecutive positions at ``layer`` (None for one)."""
        window = self.anatomy.sliding_window if self.anatomy.is_sliding(layer) else None
        return self.cache[layer].make_mask(
            rows, window_size=window, return_array=self.anatomy.mask_as_array
        )

    def _run(self, h: mx.array, start: int, stop: int) -> mx.array:
        for i in range(start, stop):
            h = self.anatomy.layers[i](h, self._mask(h, i), self.cache[i])
        return h

    def feed(self, tokens: list[int]) -> None:
        """Run ``tokens`` (a prompt chunk) through every layer into the cache; no logits."""
        assert not self.pending, "prefill after decode with pending rows is not supported"
        self._run(self.anatomy.embed(mx.array(tokens)[None]), 0, self.num_layers)
        mx.eval([c.state for c in self.cache])
        self.position += len(tokens)

    def prefill(self, tokens: list[int]) -> mx.array:
        """Feed the prompt at full depth; return the logits (1, vocab) predicting the next token."""
        assert tokens, "empty prompt"
        for chunk in prefill_chunks(len(tokens), PREFILL_STEP):
            self.feed(tokens[chunk])
        h = self._run(self.anatomy.embed(mx.array(tokens[-1:])[None]), 0, self.num_layers)
        self.position += 1
        return self.anatomy.logits(h[:, -1, :])

    def decode(self, token: int | mx.array | list[int], policy: ExitPolicy | None) -> StepResult:
        """Feed one generated token (or a verification's tokens, see ``DecodeInput``); stop
        after the first candidate layer whose entropy passes.

        ``token`` may be a not-yet-evaluated (1,) array, so the next step can be queued early.
        """
        return decode_batch(self.anatomy, [DecodeInput(self, token, policy)])[0]

    def flush(self) -> None:
        """Run every pending row to full depth, so the cache is complete for all fed tokens."""
        self.virtual_pending = 0  # decoding without speculation holds none after a flush either
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
        self.shadow.drop_unfinished()
        mx.eval([c.state for c in self.cache])


@dataclass(frozen=True)
class DecodeInput:
    """One sequence's part of a batched decode step: its loop, its next token, its exit policy,
    and the tokens it may emit (a grammar's mask, (vocab,) bool) applied at every exit check and
    at the last layer.

    ``token`` may be a list: the last token and drafted ones (``octomil.engine.verify``), fed as
    consecutive rows at full depth, with logits for every row; its mask may then be
    (rows, vocab), one per row (``octomil.engine.guided_drafts``).
    """

    loop: LayerLoop
    token: int | mx.array | list[int]
    policy: ExitPolicy | None
    mask: mx.array | None = None

    @property
    def rows(self) -> int:
        return len(self.token) if isinstance(self.token, list) else 1


@dataclass
class _Group:
    """The rows of one sequence in flight through a decode step (its token is the last row)."""

    index: int  # position in the step's inputs
    loop: LayerLoop
    policy: ExitPolicy | None  # None when this step may not exit
    waiting: list[PendingRow]  # catch-up rows that have not joined yet
    positions: list[int]  # positions of this sequence's rows in the batch, ascending
    entropy: float | None = None
    rows: int = 1  # fed tokens (the last rows); > 1: a verification, which never leaves
    pending_before: int = 0
    row_exits: dict[int, ExitDecision] = field(default_factory=dict)  # verification rows
    mask: mx.array | None = None  # allowed tokens (vocab,) bool, None: all


# What a confident row does while its neighbours continue: "row" leaves alone (its catch-up row
# rides with the next step); "batch" leaves only when every row of the batch is confident there.
EXIT_RULES = ("row", "batch")


def decode_batch(
    anatomy: Anatomy, inputs: list[DecodeInput], *, exit_rule: str = "row"
) -> list[StepResult]:
    """Feed one token to each sequence of ``inputs`` in one pass: every layer's products read the
    weights once for all rows (``octomil.engine.ragged``); each sequence may exit on its own.

    Each sequence's result is what ``LayerLoop.decode`` gives it alone (same rows, same cache):
    no product has more rows than the few-row route computes row by row (``route.max_rows()``).
    """
    max_rows = route.max_rows()  # 0: the route is off, no cap
    groups = []
    for k, item in enumerate(inputs):
        loop, n = item.loop, item.rows
        pending = len(loop.pending) + loop.virtual_pending
        can_exit = item.policy is not None and (n > 1 or pending < MAX_PENDING_ROWS)
        positions = list(range(loop.position, loop.position + n))
        policy = item.policy if can_exit else None
        groups.append(
            _Group(k, loop, policy, list(loop.pending), positions, rows=n, mask=item.mask)
        )
        groups[-1].pending_before = pending
        loop.position += n
    if len(inputs) == 1:
        h = anatomy.embed(_as_input(inputs[0].token))
    else:
        h = anatomy.embed(mx.concatenate([_as_input(i.token) for i in inputs], axis=1))
    results: list[StepResult | None] = [None] * len(inputs)
    active = groups
    for i in range(anatomy.num_layers):
        if any(r.start_layer == i for g in active for r in g.waiting):
            h = _join_rows(h, active, i)
        segments, start = [], 0
        for g in active:
            n = len(g.positions)
            cache = g.loop.cache[i]
            # A plain cache never masks one row (mlx-lm: no window, N == 1); skip asking it.
            mask = None if n == 1 and type(cache) is KVCache else g.loop.mask(n, i)
            segments.append(Segment(start, start + n, cache, mask))
            start += n
        h = run_layer(anatomy.layers[i], h, segments, max_rows)
        leaving = _exits(anatomy, h, active, segments, i + 1, exit_rule)
        if leaving and any(g.policy is not None and g.policy.observe for g, _ in leaving):
            leaving = _observe(leaving, i + 1)
        if leaving:
            for g, decision in leaving:
                seg = segments[active.index(g)]
                g.loop.pending = g.waiting + [
                    PendingRow(pos, h[:, seg.start + k : seg.start + k + 1, :], i + 1)
                    for k, pos in enumerate(g.positions)
                ]
                results[g.index] = StepResult(decision.logits, i + 1, g.entropy, exited=True)
                assert decision.logits is not None
                g.loop.shadow.sample(g.positions[-1], i + 1, decision.logits)
            gone = {id(g) for g, _ in leaving}
            kept = [(g, s) for g, s in zip(active, segments, strict=True) if id(g) not in gone]
            if not kept:
                return results  # type: ignore[return-value]
            active = [g for g, _ in kept]
            h = mx.concatenate([h[:, s.start : s.stop] for _, s in kept], axis=1)
    for g in active:
        g.loop.pending = []
        g.loop.virtual_pending = 0
    # Each sequence's last ``rows`` rows are its fed tokens (catch-up rows come before them).
    wanted = [inputs[g.index].rows for g in active]
    if len(active) == 1 and wanted[0] == 1:
        logits_all = anatomy.logits(h[:, -1, :])
    else:
        ends = list(itertools.accumulate(len(g.positions) for g in active))
        index = [r for e, n in zip(ends, wanted, strict=True) for r in range(e - n, e)]
        rows = h[0, mx.array(index)]  # (sum(wanted), D): one head product for all
        cap = max_rows or len(index)
        pieces = [anatomy.logits(rows[a : a + cap]) for a in range(0, len(index), cap)]
        logits_all = pieces[0] if len(pieces) == 1 else mx.concatenate(pieces, axis=0)
    _shadow_compare(anatomy, h, active)
    masks = _row_masks([(g, j) for g, n in zip(active, wanted, strict=True) for j in range(n)])
    if masks is not None:
        logits_all = mx.where(masks, logits_all, mx.array(-mx.inf, dtype=logits_all.dtype))
    measured = any(inputs[g.index].policy is not None for g in active)
    entropies = entropy_nats(logits_all).tolist() if measured else []  # one sync for all rows
    firsts = list(itertools.accumulate(wanted, initial=0))
    for k, g in enumerate(active):
        a, b = firsts[k], firsts[k + 1]
        logits = logits_all if len(wanted) == 1 else logits_all[a:b]
        entropy = entropies[a] if inputs[g.index].policy is not None else g.entropy
        if g.rows > 1 and g.policy is not None:  # rows that exit take their exit's logits
            logits, row_pending = exits_in_verification(logits, g.row_exits, g.pending_before)
            results[g.index] = StepResult(logits, anatomy.num_layers, None, False, row_pending)
            continue
        results[g.index] = StepResult(logits, anatomy.num_layers, entropy, exited=False)
    return results  # type: ignore[return-value]


def _observe(
    leaving: list[tuple[_Group, ExitDecision]], depth: int
) -> list[tuple[_Group, ExitDecision]]:
    """Observing policies keep their rows: a would-be exit is only shadow-checked (its row is
    compared at the last layer of this same step)."""
    kept = []
    for g, decision in leaving:
        if g.policy is not None and g.policy.observe:
            assert decision.logits is not None
            g.loop.shadow.sample(g.positions[-1], depth, decision.logits)
        else:
            kept.append((g, decision))
    return kept


def _shadow_compare(anatomy: Anatomy, h: mx.array, active: list[_Group]) -> None:
    """Rows of sampled exits that reached the last layer: one head product apart from the
    step's logits gives their full-depth predictions (``engine.shadow``)."""
    rows, owners = [], []
    start = 0
    for g in active:
        book = g.loop.shadow
        if book.probes:
            mine = [(start + k, pos) for k, pos in enumerate(g.positions) if pos in book.probes]
            if mine:
                rows += [r for r, _ in mine]
                owners.append((book, [pos for _, pos in mine]))
        start += len(g.positions)
    if not rows:
        return
    logits = anatomy.logits(h[0, mx.array(rows)])
    at = 0
    for book, positions in owners:
        book.compare(positions, logits[at : at + len(positions)])
        at += len(positions)


def _join_rows(h: mx.array, active: list[_Group], layer: int) -> mx.array:
    """Insert the catch-up rows that start at ``layer`` into their sequences' row ranges."""
    pieces, start = [], 0
    for g in active:
        n = len(g.positions)
        own = h[:, start : start + n]
        start += n
        joining = rows_joining(g.waiting, layer)
        if joining:
            own, g.positions = _merge_rows(own, g.positions, joining)
            g.waiting = [r for r in g.waiting if r.start_layer != layer]
        pieces.append(own)
    return pieces[0] if len(pieces) == 1 else mx.concatenate(pieces, axis=1)


def _exits(
    anatomy: Anatomy,
    h: mx.array,
    active: list[_Group],
    segments: list[Segment],
    depth: int,
    exit_rule: str,
) -> list[tuple[_Group, ExitDecision]]:
    """The sequences whose token leaves after ``depth`` layers, with their decisions."""
    by_policy: dict[ExitPolicy, list[tuple[_Group, int]]] = {}  # (group, row in the batch)
    for g, seg in zip(active, segments, strict=True):
        if g.policy is not None and g.policy.checks_after(depth):
            # A verification's rows not exited yet are checked too (``verify``); never leave.
            rows = [seg.stop - g.rows + j for j in range(g.rows) if j not in g.row_exits]
            for row in rows:
                by_policy.setdefault(g.policy, []).append((g, row))  # equal policies share
    decided = []
    row_exits: list[tuple[_Group, int, ExitDecision]] = []  # (group, verification row, decision)
    stops = {id(g): seg.stop for g, seg in zip(active, segments, strict=True)}
    for rows in by_policy.values():  # one head product per policy for all its rows
        policy = rows[0][0].policy
        assert policy is not None
        last = [row for _, row in rows]
        hidden = h[:, last[0], :] if len(rows) == 1 else h[0, mx.array(last)]
        masks = _row_masks([(g, row - stops[id(g)] + g.rows) for g, row in rows])
        if masks is None:
            decisions = policy.decide_rows(anatomy, hidden, depth)
        else:  # the exit is decided on, and its token drawn from, the allowed tokens only
            decisions = policy.decide_rows(anatomy, hidden, depth, masks=masks)
        for (g, row), decision in zip(rows, decisions, strict=True):
            if g.rows > 1:
                if decision.exit:
                    row_exits.append((g, row - stops[id(g)] + g.rows, decision))
                continue
            if decision.entropy is not None:
                g.entropy = decision.entropy
            decided.append((g, decision))
    # A verification's rows obey the never-exit token classes as one-token steps do.
    hits = _never_exit_hits([(g, d) for g, _, d in row_exits])
    for (g, j, decision), hit in zip(row_exits, hits, strict=True):
        if not hit:
            g.row_exits[j] = decision
    exits = [(g, d) for g, d in decided if d.exit]
    leaving = [pair for pair, hit in zip(exits, _never_exit_hits(exits), strict=True) if not hit]
    if exit_rule == "batch" and len(leaving) < len(active):
        return []
    return leaving


def _never_exit_hits(pairs: list[tuple[_Group, ExitDecision]]) -> list[bool]:
    """Per (group, exit decision): whether the token it would emit is a never-exit token
    (``engine.token_classes``); such a row continues to full depth. One gather and one sync for
    all rows whose policy has classes."""
    masked = [
        k
        for k, (g, _) in enumerate(pairs)
        if g.policy is not None and g.policy.never_exit is not None
    ]
    hits = [False] * len(pairs)
    if not masked:
        return hits
    logits = mx.concatenate([pairs[k][1].logits for k in masked], axis=0)  # type: ignore[misc]
    for k, token in zip(masked, mx.argmax(logits, axis=-1).tolist(), strict=True):
        hits[k] = bool(pairs[k][0].policy.never_exit[token].item())  # type: ignore[union-attr, index]
    return hits


def _row_masks(rows: list[tuple[_Group, int]]) -> mx.array | None:
    """The allowed-token masks of (group, fed row) pairs as (B, vocab) bool (all allowed where a
    group has none; a verification's (rows, vocab) mask gives each row its own), or None when no
    group is constrained."""
    if all(g.mask is None for g, _ in rows):
        return None

    def row_mask(g: _Group, j: int) -> mx.array:
        assert g.mask is not None
        return g.mask if g.mask.ndim == 1 else g.mask[j]

    if len(rows) == 1:
        return row_mask(*rows[0])[None]
    like = next(g.mask for g, _ in rows if g.mask is not None)
    full = mx.ones(like.shape[-1:], dtype=mx.bool_)
    return mx.stack([full if g.mask is None else row_mask(g, j) for g, j in rows])


def _as_input(token: int | mx.array | list[int]) -> mx.array:
    """A step's token id(s) as its (1, rows) input."""
    if isinstance(token, list):
        return mx.array([token])
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

    def feed(self, tokens: list[int]) -> None:
        self.model(mx.array(tokens)[None], cache=self.cache)
        mx.eval([c.state for c in self.cache])
        self.position += len(tokens)

    def prefill(self, tokens: list[int]) -> mx.array:
        for chunk in prefill_chunks(len(tokens), PREFILL_STEP):
            self.feed(tokens[chunk])
        self.position += 1
        return self.model(mx.array(tokens[-1:])[None], cache=self.cache)[:, -1, :]

    def decode(self, token: int | mx.array | list[int], policy: ExitPolicy | None) -> StepResult:
        tokens = _as_input(token)
        self.position += tokens.shape[1]
        logits = self.model(tokens, cache=self.cache)[0]
        return StepResult(logits, self.num_layers, None, exited=False)

    def flush(self) -> None:
        mx.eval([c.state for c in self.cache])
