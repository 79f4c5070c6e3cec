"""Test configuration: make JAX strict so silent broadcasts fail loudly."""

import jax
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")
# Tests compare against float32/float64 references: on GPUs, where float32 matmuls default
# to TF32, ask for full precision so tolerances mean the same on every platform.
jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture
def key():
    """A fresh, fixed PRNG key for each test."""
    return jax.random.key(0)
