"""Per-family anatomy of an mlx-lm model: the pieces the early-exit layer loop needs.

For each supported family we name the token embedding (and its scaling), the decoder layers, the
final norm and the shared head (tied embedding or separate ``lm_head``, with gemma2's final-logit
soft-capping). The layer loop runs these pieces itself instead of calling ``model(...)``.
Families not listed are served at full depth through the model's own ``__call__``.
Modules are looked up at call time, because choosing a weight layout replaces them.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

# mlx-lm model_type values whose layer stack we can run piece by piece ("mistral" loads as llama).
SUPPORTED_FAMILIES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3"})
_SCALED_EMBEDDING = frozenset({"gemma", "gemma2"})


@dataclass(frozen=True)
class Anatomy:
    """Embedding, decoder layers, final norm and shared head of ``model``."""

    family: str
    model: nn.Module

    @property
    def layers(self) -> list[nn.Module]:
        return self.model.model.layers

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def mask_as_array(self) -> bool:
        # gemma2 soft-caps attention scores and adds the mask itself: it needs an array.
        return self.family == "gemma2"

    @property
    def sliding_window(self) -> int | None:
        return getattr(self.model.model, "sliding_window", None)

    def is_sliding(self, layer_index: int) -> bool:
        return bool(getattr(self.layers[layer_index], "use_sliding", False))

    def embed(self, tokens: mx.array) -> mx.array:
        """Token ids (B, L) -> hidden states (B, L, D)."""
        h = self.model.model.embed_tokens(tokens)
        if self.family in _SCALED_EMBEDDING:
            h = h * (self.model.args.hidden_size**0.5)
        return h

    def norm(self, h: mx.array) -> mx.array:
        return self.model.model.norm(h)

    def head(self, normed: mx.array) -> mx.array:
        """Shared head on a normed hidden state: logits (..., vocab)."""
        if hasattr(self.model, "lm_head"):
            logits = self.model.lm_head(normed)
        else:
            logits = self.model.model.embed_tokens.as_linear(normed)
        cap = getattr(self.model, "final_logit_softcapping", None)
        if self.family == "gemma2" and cap:
            logits = mx.tanh(logits / cap) * cap
        return logits

    def head_cost_in_layers(self) -> float:
        """Weights read by one head evaluation, in units of one decoder layer's weights."""
        if hasattr(self.model, "lm_head"):
            head = _parameter_count(self.model.lm_head)
        else:
            head = _parameter_count(self.model.model.embed_tokens)
        return head / max(1, _parameter_count(self.layers[0]))

    def logits(self, h: mx.array) -> mx.array:
        """What the model predicts from hidden state ``h`` at any layer (final norm, then head)."""
        return self.head(self.norm(h))


def _parameter_count(module: nn.Module) -> int:
    from mlx.utils import tree_flatten

    return sum(v.size for _, v in tree_flatten(module.parameters()))


def model_family(model: nn.Module) -> str:
    return str(getattr(model, "model_type", None) or model.args.model_type)


def anatomy_of(model: nn.Module) -> Anatomy | None:
    """Anatomy of ``model``, or None when its family is not supported for early exit."""
    family = model_family(model)
    if family not in SUPPORTED_FAMILIES:
        return None
    return Anatomy(family=family, model=model)
