"""Tiny random mlx-lm models of each family, a byte-level tokenizer, and an Engine around them.

The models are built from mlx-lm's own ``ModelArgs`` with Hugging Face config keys (hidden 64,
4 layers, 4 heads / 2 KV heads, vocab 320), so they exercise exactly the module code real
checkpoints load into. Norm weights are randomized too: with all-ones norms a wrong norm (e.g.
gemma's ``1 + weight``) would go unnoticed.
"""

import octomil  # noqa: F401, I001  (loads OpenBLAS; must precede every mlx import)

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.utils import _get_classes

from octomil.config import EarlyExitSettings
from octomil.engine.engine import Engine
from octomil.models.anatomy import anatomy_of, model_family
from octomil.models.fast_modules import install_fast_modules
from octomil.models.layout import LayoutChoice
from octomil.models.loader import LoadedModel

VOCAB_SIZE = 320  # 256 byte tokens + <|endoftext|> + reserved specials
NUM_LAYERS = 4
CONTEXT_LENGTH = 512

_COMMON = {
    "hidden_size": 64,
    "num_hidden_layers": NUM_LAYERS,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": VOCAB_SIZE,
    "rms_norm_eps": 1e-5,
}

# Config per family, as in a checkpoint's config.json (only what differs from _COMMON).
FAMILY_CONFIGS: dict[str, dict] = {
    "llama": {"model_type": "llama"},
    # mlx-lm loads "mistral" with its llama module; Mistral checkpoints do not tie the head.
    "mistral": {"model_type": "mistral", "tie_word_embeddings": False},
    "qwen2": {"model_type": "qwen2", "rope_theta": 1e6},
    "qwen3": {
        "model_type": "qwen3",
        "head_dim": 16,
        "max_position_embeddings": CONTEXT_LENGTH,
        "tie_word_embeddings": True,
        "rope_theta": 1e6,
    },
    "gemma": {"model_type": "gemma", "head_dim": 16, "rms_norm_eps": 1e-6},
    "gemma2": {
        "model_type": "gemma2",
        "head_dim": 16,
        "rms_norm_eps": 1e-6,
        "query_pre_attn_scalar": 16,
        "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0,
    },
    "phi3": {"model_type": "phi3"},
    # No anatomy for this family: the engine must serve it at full depth.
    "starcoder2": {"model_type": "starcoder2", "norm_epsilon": 1e-5},
}
SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3")
UNSUPPORTED = "starcoder2"

# Named variants: (family, config overrides).
VARIANTS: dict[str, tuple[str, dict]] = {
    **{f: (f, {}) for f in FAMILY_CONFIGS},
    "llama-untied": ("llama", {"tie_word_embeddings": False}),
    "qwen2-untied": ("qwen2", {"tie_word_embeddings": False}),
    # Alternating sliding / global attention (mlx-lm's llama ``layer_types``); a window of 4 is
    # shorter than any test prompt, so the rotating caches wrap.
    "llama-sliding": (
        "llama",
        {
            "layer_types": ["sliding_attention", "full_attention"] * (NUM_LAYERS // 2),
            "sliding_window": 4,
        },
    ),
}


def tiny_config(family: str, **overrides) -> dict:
    cfg = dict(_COMMON)
    if family == "starcoder2":
        del cfg["rms_norm_eps"]
    cfg.update(FAMILY_CONFIGS[family])
    cfg.update(overrides)
    return cfg


def make_tiny_model(family: str, seed: int = 0, **overrides) -> nn.Module:
    """A random fp32 mlx-lm model of ``family`` or of a named variant; same ``seed``, same model."""
    if family in VARIANTS and family not in FAMILY_CONFIGS:
        family, base = VARIANTS[family]
        overrides = {**base, **overrides}
    config = tiny_config(family, **overrides)
    model_class, args_class = _get_classes(config)
    mx.random.seed(seed)
    model = model_class(args_class.from_dict(config))
    params = tree_flatten(model.parameters())
    noisy = [(k, v + 0.1 * mx.random.normal(v.shape)) for k, v in params if "norm" in k]
    model.update(tree_unflatten(noisy))
    mx.eval(model.parameters())
    return model


def save_tiny_checkpoint(path, model: nn.Module, tokenizer, **config) -> None:
    """``model`` (a tiny llama) as a checkpoint directory the loader reads: weights, the tiny
    llama ``config.json`` with ``config`` over it, and ``tokenizer``."""
    from mlx_lm.utils import save_config, save_model

    save_model(path, model)
    save_config(tiny_config("llama", **config), path / "config.json")
    tokenizer.save_pretrained(str(path))


def sharpen(model: nn.Module, embed_factor: float = 4.0, head_factor: float = 20.0) -> nn.Module:
    """Make every layer's shared-head distribution peaked, as early exit needs.

    Random models predict near-uniform distributions (entropy ~ ln(vocab)). A larger embedding
    makes the residual stream follow the input token, so a tied head peaks on it at every layer;
    an untied head is random, so it is scaled. Scaling a tied head instead (e.g. via the final
    norm) fails on gemma2: its soft-cap squashes the many large logits into a near-tie.
    """
    embed = model.model.embed_tokens
    embed.weight = embed_factor * embed.weight
    if hasattr(model, "lm_head"):
        model.lm_head.weight = head_factor * model.lm_head.weight
    mx.eval(model.parameters())
    return model


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map used by byte-level BPE."""
    keep = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def make_byte_tokenizer(vocab_size: int = VOCAB_SIZE, specials: tuple[str, ...] = ()):
    """A byte-level tokenizer (id == byte value, no merges) with ``<|endoftext|>`` as id 256 and
    reserved special tokens up to ``vocab_size``, as a transformers PreTrainedTokenizerFast.
    ``specials``: other names for the first special tokens (the first is the EOS), e.g. a chat
    template family's markers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    names = ["<|endoftext|>"] + [f"<|reserved_{i}|>" for i in range(vocab_size - 257)]
    names[: len(specials)] = specials
    tok.add_special_tokens(names)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=names[0])
    assert len(fast) == vocab_size and fast.eos_token_id == 256
    return fast


def tiny_engine(
    model: nn.Module,
    tokenizer,
    early_exit: EarlyExitSettings | None = None,
    exit_layers: tuple[int, ...] | None = None,
    context_length: int = CONTEXT_LENGTH,
) -> Engine:
    """An Engine serving ``model`` as the loader would, minus files and layout measurement.

    Like the loader, it installs the fast drop-in modules (table RoPE, compiled RMS norm): compare
    against a separately made reference model (same ``make_tiny_model`` arguments), not ``model``.
    """
    install_fast_modules(model)
    family = model_family(model)
    loaded = LoadedModel(
        name=f"tiny-{family}",
        model=model,
        tokenizer=tokenizer,
        family=family,
        anatomy=anatomy_of(model),
        layout=LayoutChoice("native", {}, measured=False),
        native_layout="float32",
        context_length=context_length,
        eos_token_ids=frozenset({int(tokenizer.eos_token_id)}),
        source="<memory>",
    )
    return Engine(loaded, early_exit or EarlyExitSettings(), exit_layers)
