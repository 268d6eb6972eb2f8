"""The matrix shapes of one llama decoder layer, for the report's product micro-benchmarks.

Shared by ``report.py`` (numpy) and ``report_worker.py`` (MLX); imports nothing heavy.
"""

from __future__ import annotations


def projection_shapes(dims: dict) -> list[tuple[str, int, int]]:
    """(name, out, in) of one llama decoder layer's projections."""
    d, f = dims["hidden_size"], dims["intermediate_size"]
    kv = d // dims["num_attention_heads"] * dims["num_key_value_heads"]
    return [
        ("q", d, d),
        ("k", kv, d),
        ("v", kv, d),
        ("o", d, d),
        ("gate", f, d),
        ("up", f, d),
        ("down", d, f),
    ]
