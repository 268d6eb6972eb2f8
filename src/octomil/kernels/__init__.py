"""Decode kernels: MLX primitives for the row-wise work of decode steps (``decode``)."""
