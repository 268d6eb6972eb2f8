"""Fixtures for unit tests on tiny random models (see ``tiny_models``)."""

import octomil  # noqa: F401, I001  (loads OpenBLAS; must precede every mlx import)

import pytest

import tiny_models


@pytest.fixture(scope="session")
def byte_tokenizer():
    return tiny_models.make_byte_tokenizer()


@pytest.fixture
def make_tiny_model():
    """Factory: ``make_tiny_model(family, seed=0, **config_overrides) -> nn.Module``."""
    return tiny_models.make_tiny_model
