"""Token classes that never exit early: a vocabulary mask consulted by the exit decision.

Some tokens are costly to get wrong and cheap to get right at full depth: digits, code
identifiers, the first token of a JSON key, strings an operator lists. A row whose exit-layer
prediction (the argmax of the distribution it would be emitted from) is in the mask does not
leave; it continues through the remaining layers as if its check had failed, so the token it emits
is the full-depth one.

The classes are decided per token of the vocabulary, from its decoded text, so the mask costs one
gather per exiting row and no text work while decoding:

- ``digits``: the token contains a decimal digit;
- ``code_identifiers``: an identifier piece that is not a plain word: contains ``_`` or ``.``
  between word characters, or mixes lower and upper case after the first letter (camelCase);
- ``json_keys``: the token opens a quoted string (its text starts with ``"`` after optional
  spaces or ``{``/``,``); the key's first word piece usually *is* that token in byte-level BPE
  vocabularies (``{"``, `` "name``), and it is the choice that decides which key follows;
- ``strings``: tokens whose text, stripped of surrounding spaces, equals a listed string.
"""

from __future__ import annotations

import re
from typing import Any

import mlx.core as mx

from octomil.policy_file import NeverExit

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_CAMEL = re.compile(r"[a-z][A-Z]")
_OPENS_STRING = re.compile(r'^[\s{,\[]*"')


def in_class(text: str, classes: NeverExit) -> bool:
    core = text.strip()
    if not core:
        return False
    if classes.digits and any(c.isdigit() for c in core):
        return True
    if (
        classes.code_identifiers
        and _IDENTIFIER.match(core)
        and ("_" in core.strip("_") or "." in core or _CAMEL.search(core))
    ):
        return True
    if classes.json_keys and _OPENS_STRING.match(text):
        return True
    return core in {s.strip() for s in classes.strings}


def never_exit_mask(tokenizer: Any, vocab_size: int, classes: NeverExit) -> mx.array | None:
    """Boolean (vocab,) mask of the tokens in ``classes``; None when no class is set."""
    if not classes.any:
        return None
    flags = [False] * vocab_size
    for token_id in range(min(vocab_size, len(tokenizer))):
        flags[token_id] = in_class(tokenizer.decode([token_id]), classes)
    return mx.array(flags)
