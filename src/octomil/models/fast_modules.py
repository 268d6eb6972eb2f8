"""Replace mlx-lm modules that are slow on MLX's CPU backend with drop-ins computing the same.

Called once on a loaded model (``octomil.models.loader.load``) before the engine takes it:
RoPE from a per-step shared table (``rope_table``), RMS norm as one compiled kernel
(``rms_norm``), and attention's softmax and the MLP's SwiGLU on Octomil's kernels
(``kernel_modules``). Parameter names and call signatures are unchanged, so mlx-lm's own forward
pass, the engine's layer loop and saved weights all keep working.
"""

from __future__ import annotations

import mlx.nn as nn

from octomil.models.kernel_modules import install_kernel_modules
from octomil.models.rms_norm import install_compiled_rms_norm
from octomil.models.rope_table import install_table_rope


def install_fast_modules(model: nn.Module) -> dict[str, int]:
    """Swap the modules in place; returns how many of each kind were replaced."""
    return {
        "rope": install_table_rope(model),
        "rms_norm": install_compiled_rms_norm(model),
        "kernel_modules": install_kernel_modules(model),
    }
