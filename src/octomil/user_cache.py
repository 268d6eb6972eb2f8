"""Where Octomil keeps per-user derived files: ``$OCTOMIL_CACHE``, default ``~/.cache/octomil``.

Everything there can be rebuilt (weight hashes, calibrated policies, the compiled few-row BLAS
route), so a read-only or missing home only costs time. Imports nothing heavy: ``octomil.blas``
uses it before ``mlx`` is loaded.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("OCTOMIL_CACHE") or default_cache_dir())


def default_cache_dir() -> Path:
    """The cache without ``$OCTOMIL_CACHE``: where ``make setup`` builds the native code."""
    return Path.home() / ".cache" / "octomil"
