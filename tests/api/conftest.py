import octomil  # noqa: F401  - must precede anything that imports mlx (BLAS preload)
