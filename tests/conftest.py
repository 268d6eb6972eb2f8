"""Shared test setup. ``octomil`` is imported first so OpenBLAS is loaded before ``mlx``."""

import octomil  # noqa: F401  (must precede any mlx import)
