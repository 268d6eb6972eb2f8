"""The speculative-sampling acceptance rule (Leviathan et al. 2023; Chen et al. 2023).

Draft token d at position j, drafted with probability q(d), is accepted with probability
min(1, p(d) / q(d)) where p is the target distribution of row j (the request's own sampling
distribution: repetition penalty, top-k / top-p, temperature). At the first rejection the token
is drawn from the residual max(p - q, 0), normalised; when every draft is accepted, the extra
token is drawn from p of the last row. The output then has exactly the target distribution.
A deterministic drafter (prompt lookup) has q = one-hot(d): acceptance p(d), residual p without d.

Greedy requests need no rule: a draft is kept when it equals the row's argmax
(``verify.accepted_greedy``), so the tokens are those of decoding without speculation.
"""

from __future__ import annotations

import mlx.core as mx


def accept_sampled(
    sample_logits: mx.array,
    drafts: list[int],
    key: mx.array,
    draft_probs: mx.array | None = None,
) -> tuple[int, int]:
    """``sample_logits`` (K+1, vocab): each row's target as logits (``softmax`` gives p);
    ``draft_probs`` (K, vocab): q of each draft position, None for a deterministic drafter.
    Returns (number of accepted drafts m, the token that follows them)."""
    k = len(drafts)
    u_key, c_key = mx.random.split(key)
    p = mx.softmax(sample_logits.astype(mx.float32), axis=-1)
    idx = mx.array(drafts)
    rows = mx.arange(k)
    p_d = p[rows, idx] if k else mx.zeros((0,))
    if draft_probs is None:
        ratio = p_d
    else:
        ratio = mx.minimum(p_d / draft_probs[rows, idx], 1.0)
    uniforms = mx.random.uniform(shape=(k,), key=u_key)
    accepted = (uniforms < ratio).tolist() if k else []  # one sync
    m = 0
    while m < k and accepted[m]:
        m += 1
    if m == k:
        return m, int(mx.random.categorical(sample_logits[k], key=c_key).item())
    if draft_probs is None:
        residual = mx.where(mx.arange(p.shape[-1]) == drafts[m], 0.0, p[m])
    else:
        residual = mx.maximum(p[m] - draft_probs[m], 0.0)
    return m, int(mx.random.categorical(mx.log(residual), key=c_key).item())
