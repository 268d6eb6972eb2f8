"""Read a llama-architecture GGUF file with MLX's own reader into an mlx-lm model.

``mx.load`` returns Q4_1/Q8_0 tensors as MLX quantized triples (weight, scales, biases), so the
quantized layers map straight onto ``nn.QuantizedLinear``. Tensor names are llama.cpp's and are
mapped to mlx-lm's. GGUF stores Q/K rows permuted for llama.cpp's rotary layout, which is the
"traditional" (interleaved) RoPE in MLX terms, hence ``rope_traditional=True``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

_NAME_MAP = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_MAP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_SUFFIXES = ("weight", "scales", "biases", "bias")


def _mlx_name(name: str) -> str:
    m = re.match(r"blk\.(\d+)\.(\w+)\.(\w+)$", name)
    if m:
        layer, part, suffix = m.groups()
        return f"model.layers.{layer}.{_NAME_MAP[part]}.{suffix}"
    base, suffix = name.rsplit(".", 1)
    return f"{_TOP_MAP[base]}.{suffix}"


def _scalar(v: Any) -> Any:
    return v.item() if isinstance(v, mx.array) else v


def _config(meta: dict[str, Any]) -> dict[str, Any]:
    arch = str(meta["general.architecture"])
    if arch != "llama":
        raise ValueError(f"GGUF architecture {arch!r} is not supported (only 'llama')")

    def get(key: str, default: Any = None) -> Any:
        return _scalar(meta.get(f"{arch}.{key}", default))

    heads = int(get("attention.head_count"))
    return {
        "model_type": "llama",
        "hidden_size": int(get("embedding_length")),
        "num_hidden_layers": int(get("block_count")),
        "intermediate_size": int(get("feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        "vocab_size": int(get("vocab_size", len(meta["tokenizer.ggml.tokens"]))),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "rope_traditional": True,
        "max_position_embeddings": int(get("context_length", 2048)),
    }


def _quant_params(weights: dict[str, mx.array], prefix: str, in_features: int) -> tuple[int, int]:
    """(group_size, bits) of a quantized triple, from its packed and scale shapes."""
    packed = weights[f"{prefix}.weight"].shape[-1]
    groups = weights[f"{prefix}.scales"].shape[-1]
    bits = packed * 32 // in_features
    return in_features // groups, bits


def load_gguf(path: Path) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """``(model, config, metadata)``; quantized tensors stay quantized (layout chosen later)."""
    from mlx_lm.models import llama

    raw, meta = mx.load(str(path), return_metadata=True)
    config = _config(meta)
    weights = {_mlx_name(k): v for k, v in raw.items()}
    config["tie_word_embeddings"] = "lm_head.weight" not in weights
    args = llama.ModelArgs.from_dict(config)
    model = llama.Model(args)

    hidden = args.hidden_size
    quantized = {k.rsplit(".", 1)[0] for k in weights if k.endswith(".scales")}

    def predicate(name: str, module: nn.Module) -> bool | dict[str, int]:
        if name not in quantized:
            return False
        in_features = module.weight.shape[-1] if not isinstance(module, nn.Embedding) else hidden
        group_size, bits = _quant_params(weights, name, in_features)
        return {"group_size": group_size, "bits": bits}

    nn.quantize(model, class_predicate=predicate)
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())
    return model, config, meta
