"""Octomil: an OpenAI-compatible LLM server on MLX whose engine lets confident tokens exit early.

Importing the package loads a real BLAS before anything imports ``mlx`` (see ``octomil.blas``):
on Linux the bundled reference BLAS is ~30x slower for the matrix products decoding needs.
"""

from octomil import blas as _blas

_blas.preload()

__version__ = "0.1.0"
