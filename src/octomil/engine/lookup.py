"""Prompt lookup: draft the tokens that followed the latest earlier occurrence of the current
suffix (n = 3, then 2, then 1 tokens) in the prompt and the output so far.

Drafts cost no model evaluation, so they pay wherever the answer copies its input: rewrites,
edits, extraction, quoting, code. The index maps every n-gram to the position after its latest
occurrence and is updated as tokens arrive (O(n) per token), so drafting is O(1) per step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from octomil.engine.guided_drafts import DraftGuide

NGRAM_SIZES = (3, 2, 1)


class LookupDrafter:
    """``min_n``: the shortest suffix that may match (1-token matches are the weakest drafts)."""

    def __init__(self, tokens: list[int], min_n: int = 1) -> None:
        self._sizes = tuple(n for n in NGRAM_SIZES if n >= min_n)
        self._tokens: list[int] = []
        self._after: dict[tuple[int, ...], int] = {}  # n-gram -> index of the token after it
        self.extend(tokens)

    def extend(self, tokens: list[int]) -> None:
        for token in tokens:
            t = self._tokens
            i = len(t)  # index of ``token``: the n-grams ending just before it are followed now
            for n in NGRAM_SIZES:
                if i >= n:
                    self._after[tuple(t[i - n : i])] = i
            t.append(token)

    def draft(self, k: int, guide: DraftGuide | None = None) -> list[int]:
        """Up to ``k`` tokens predicted to follow the tokens so far (may be empty); under a
        ``guide``, cut at the first token its grammar does not allow."""
        drafts = self._lookup(k)
        return drafts if guide is None else guide.take(drafts)

    def _lookup(self, k: int) -> list[int]:
        t = self._tokens
        if k <= 0:
            return []
        for n in self._sizes:
            if len(t) >= n:
                start = self._after.get(tuple(t[-n:]))
                if start is not None:
                    return t[start : start + k]
        return []
