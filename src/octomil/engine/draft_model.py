"""``model:M`` drafting: a smaller model with the same tokenizer proposes the next K tokens.

The draft model decodes greedily, so its drafts are a deterministic function of the context and
the acceptance rule treats them as one-hot proposals (``octomil.engine.spec_accept``): lossless
for greedy and sampled requests alike. Each request owns a draft cache (its own loop over the
draft model); before drafting, the draft cache is trimmed back to the longest prefix it shares
with the request's tokens (drafts the target rejected) and fed the tokens it has not seen.

Speculation needs both models to read token ids the same way: :func:`check_same_vocabulary`
refuses a draft model whose tokenizer maps any id to another string.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import mlx.core as mx

from octomil.engine.constraint import apply_mask
from octomil.engine.layer_loop import PREFILL_STEP, FullDepthLoop, LayerLoop
from octomil.engine.verify import can_speculate, rollback

if TYPE_CHECKING:
    from octomil.engine.guided_drafts import DraftGuide


class DraftModelError(ValueError):
    """The draft model cannot serve as a drafter for the target; one line."""


def check_same_vocabulary(name: str, target: Any, draft: Any) -> None:
    """Raise :class:`DraftModelError` unless ``draft`` (a LoadedModel) reads ids as ``target``."""
    mine, theirs = target.tokenizer.get_vocab(), draft.tokenizer.get_vocab()
    if mine != theirs:
        differ = sorted(set(mine.items()) ^ set(theirs.items()), key=lambda kv: kv[1])
        example = f"; e.g. {differ[0][0]!r} (id {differ[0][1]})" if differ else ""
        raise DraftModelError(
            f"draft model {name!r} has a different vocabulary than {target.name!r} "
            f"({len(theirs)} vs {len(mine)} tokens{example}): speculative decoding needs the "
            "same tokenizer"
        )
    loop = _new_loop(draft)
    if not can_speculate(loop):
        raise DraftModelError(
            f"draft model {name!r} uses sliding-window caches, which cannot be rolled back"
        )


def _new_loop(loaded: Any) -> LayerLoop | FullDepthLoop:
    if loaded.anatomy is not None:
        return LayerLoop(loaded.anatomy, loaded.model)
    return FullDepthLoop(loaded.model)


class DraftModelDrafter:
    def __init__(self, loaded: Any, tokens: list[int]) -> None:
        self._loop = _new_loop(loaded)
        self._tokens = list(tokens)  # the request's tokens so far
        self._fed: list[int] = []  # tokens in the draft cache

    def extend(self, tokens: list[int]) -> None:
        self._tokens.extend(tokens)

    def draft(self, k: int, guide: DraftGuide | None = None) -> list[int]:
        """Up to ``k`` greedy drafts; under a ``guide``, each the argmax over the tokens its
        grammar allows after the drafts before it."""
        t, fed = self._tokens, self._fed
        keep = 0
        while keep < min(len(fed), len(t) - 1) and fed[keep] == t[keep]:
            keep += 1
        rollback(self._loop, len(fed) - keep)
        for a in range(keep, len(t) - 1, PREFILL_STEP):
            self._loop.feed(t[a : min(a + PREFILL_STEP, len(t) - 1)])
        fed[:] = t[:-1]
        token, out = t[-1], []
        for _ in range(k):
            if guide is not None and not guide.open:
                break
            logits = self._loop.decode(token, None).logits[-1:]
            fed.append(token)
            if guide is not None:
                logits = apply_mask(logits, guide.mask())
            token = int(mx.argmax(logits[-1]).item())
            if guide is not None and not guide.push(token):
                break  # EOS: the target's own row decides whether to end
            out.append(token)
        return out
