"""Compact weights at full speed: 8- and 4-bit products on MLX's CPU backend (``--dtype q8|q4``)."""
