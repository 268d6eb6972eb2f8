"""Token ids -> printable text deltas, with stop strings held back and cut.

Text that could still become a stop string is withheld until it cannot; a stop string found in
the text ends generation and is not emitted (OpenAI semantics).
"""

from __future__ import annotations

from typing import Any


class TextStream:
    def __init__(self, tokenizer: Any, stop: tuple[str, ...] = ()) -> None:
        from mlx_lm.tokenizer_utils import NaiveStreamingDetokenizer

        # The naive detokenizer decodes the running sequence, so it is right for every tokenizer
        # family (byte-level BPE, SentencePiece) and holds back incomplete UTF-8 sequences.
        self._detok = NaiveStreamingDetokenizer(tokenizer)
        self._detok.reset()
        self._stop = tuple(s for s in stop if s)
        self._pending = ""  # decoded but not yet emitted (may be the start of a stop string)
        self.stopped = False

    def add(self, token: int) -> str:
        """Feed one token; return the text that is now safe to emit."""
        self._detok.add_token(token)
        self._pending += self._detok.last_segment
        return self._release(final=False)

    def finish(self) -> str:
        """Flush what is left at the end of generation."""
        if self.stopped:
            return ""
        self._detok.finalize()
        self._pending += self._detok.last_segment
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if not self._stop:
            out, self._pending = self._pending, ""
            return out
        hits = [(self._pending.find(s), s) for s in self._stop]
        hits = [(i, s) for i, s in hits if i >= 0]
        if hits:
            cut = min(i for i, _ in hits)
            out = self._pending[:cut]
            self._pending = ""
            self.stopped = True
            return out
        if final:
            out, self._pending = self._pending, ""
            return out
        hold = _longest_stop_prefix_suffix(self._pending, self._stop)
        out = self._pending[: len(self._pending) - hold]
        self._pending = self._pending[len(out) :]
        return out


def _longest_stop_prefix_suffix(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best
