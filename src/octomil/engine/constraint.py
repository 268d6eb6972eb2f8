"""Grammar-constrained decoding: which tokens a request may emit next (llguidance).

A request that asks for structure (a JSON schema, JSON mode, a regex, a list of choices or a Lark
grammar) carries a :class:`GrammarSpec` in its sampling params. The engine compiles it once per
request into a :class:`Constraint` (an llguidance matcher over the model's tokenizer) and asks it,
before every decode step, for the allowed-token mask.

The mask is applied wherever a token can be chosen, not only at the last layer: the exit check at
an intermediate layer measures the entropy of the *masked* distribution and the exited token is
sampled from it (``layer_loop.decode_batch``), so a token confident only before the mask (a JSON
key the grammar forbids) never leaves early. Invariant: every emitted token is one the grammar
allowed at that point, so a completion that ends with ``finish_reason == "stop"`` is complete in
the grammar; one cut by ``max_tokens`` ends with ``"length"``.

When the grammar allows exactly one continuation (JSON punctuation, a key's remaining letters,
an enum's tail), llguidance returns those *forced* tokens and the generation emits them without a
model pass: they are fed to the KV cache as one prompt-like chunk (fast-forward).

llguidance was chosen by ``benchmarks/grammar_libs_bench.py``: masks cost well under 1% of a
decode step on this CPU, a schema compiles in ~1 ms (outlines-core builds a vocabulary-wide index
per schema: 0.05-0.8 s), it computes forced tokens, and it names unimplemented keywords instead of
ignoring them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np

from octomil.engine.errors import EngineInputError

KINDS = ("json_object", "json_schema", "regex", "choice", "grammar")
# Compact JSON without free whitespace: small models otherwise loop on spaces and newlines.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}


@dataclass(frozen=True)
class GrammarSpec:
    """What a request's output must match. ``value``: a schema dict (json_schema), a regex or Lark
    text, or a tuple of strings (choice); ``param`` names the request field for error messages."""

    kind: str
    value: Any = None
    param: str = "response_format"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"grammar kind must be one of {KINDS}")


class GrammarError(EngineInputError):
    """The grammar does not compile: an invalid schema, an unsupported keyword, a bad regex."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message, param=param, code="invalid_grammar")


def grammar_text(spec: GrammarSpec) -> str:
    """The llguidance grammar for ``spec`` (not yet checked against a tokenizer)."""
    from llguidance import LLMatcher

    if spec.kind == "json_object":
        return LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
    if spec.kind == "json_schema":
        if not isinstance(spec.value, dict):
            raise GrammarError("the JSON schema must be an object", spec.param)
        try:
            return LLMatcher.grammar_from_json_schema(spec.value, defaults=JSON_OPTIONS)
        except ValueError as exc:
            raise GrammarError(f"invalid JSON schema: {exc}", spec.param) from None
    if spec.kind == "regex":
        return LLMatcher.grammar_from_regex(str(spec.value))
    if spec.kind == "choice":
        choices = list(spec.value or ())
        if not choices or not all(isinstance(c, str) and c for c in choices):
            raise GrammarError(
                "guided_choice must be a non-empty list of non-empty strings", spec.param
            )
        alternatives = " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)
        return LLMatcher.grammar_from_lark(f"start: {alternatives}")
    return LLMatcher.grammar_from_lark(str(spec.value))


class GrammarCompiler:
    """Compiles specs for one tokenizer. Building llguidance's tokenizer takes ~1 s: done once,
    at the first structured request."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: frozenset[int]) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._eos = sorted(eos_token_ids)
        self._ll: Any = None

    @property
    def ll_tokenizer(self) -> Any:
        if self._ll is None:
            import llguidance.hf

            self._ll = llguidance.hf.from_tokenizer(
                self._tokenizer, n_vocab=self.vocab_size, eos_token=self._eos or None
            )
        return self._ll

    def compile(self, spec: GrammarSpec) -> Constraint:
        """A fresh constraint for one request; raises :class:`GrammarError` naming the problem."""
        from llguidance import LLMatcher

        grammar = grammar_text(spec)
        is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar, self.ll_tokenizer)
        if is_error:
            error = messages[0] if messages else "does not compile"
            what = {"regex": "regex", "choice": "choice", "grammar": "grammar"}.get(
                spec.kind, "JSON schema"
            )
            raise GrammarError(f"invalid {what}: {error.strip()}", spec.param)
        matcher = LLMatcher(self.ll_tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(matcher.get_error(), spec.param)
        return Constraint(matcher, self.vocab_size)


class Constraint:
    """One request's grammar state: the mask of allowed next tokens, forced tokens, completion."""

    def __init__(self, matcher: Any, vocab_size: int) -> None:
        self._matcher = matcher
        self.vocab_size = vocab_size
        self._bits = np.zeros((vocab_size + 31) // 32, dtype=np.int32)

    def mask(self) -> mx.array:
        """(vocab,) bool: True where the grammar allows the token next."""
        self.mask_bits(self._bits)
        return bits_to_masks(self._bits[None], self.vocab_size)[0]

    def mask_bits(self, out: np.ndarray) -> None:
        """Write the allowed-token bitmask (one bit per token, little-endian int32 words) into
        ``out``, a contiguous row of ``(vocab + 31) // 32`` int32."""
        assert out.dtype == np.int32 and out.flags.c_contiguous and out.shape == self._bits.shape
        self._matcher.unsafe_compute_mask_ptr(out.ctypes.data, out.nbytes)

    def rollback(self, tokens: int) -> None:
        """Forget the last ``tokens`` accepted tokens (drafts walked through for their masks)."""
        if tokens > 0 and not self._matcher.rollback(tokens):
            raise RuntimeError(f"the grammar could not roll back {tokens} tokens")

    def accept(self, token: int) -> bool:
        """Advance past ``token``; False when the grammar rejected it (the matcher is then in
        an error state and allows nothing more)."""
        return bool(self._matcher.consume_token(token))

    def forced(self) -> list[int]:
        """Tokens the grammar allows as the only continuation from here (may be empty)."""
        return list(self._matcher.compute_ff_tokens())

    @property
    def done(self) -> bool:
        """The grammar is complete and allows no further token."""
        return bool(self._matcher.is_stopped())

    @property
    def failed(self) -> bool:
        return bool(self._matcher.is_error())


def bits_to_masks(bits: np.ndarray, vocab_size: int) -> mx.array:
    """(R, words) int32 bitmasks -> (R, vocab) bool, in one unpacking."""
    flat = np.unpackbits(bits.view(np.uint8), axis=-1, bitorder="little")[:, :vocab_size]
    return mx.array(flat.astype(np.bool_))


def apply_mask(logits: mx.array, mask: mx.array) -> mx.array:
    """``logits`` (B, vocab) with the disallowed tokens at -inf; ``mask`` (vocab,) or (B, vocab)."""
    return mx.where(mask, logits, mx.array(-mx.inf, dtype=logits.dtype))
