import jax
import pytest


# Tests compare against float64 oracles. float32 matmuls at full precision: on GPUs
# JAX's default precision for them is TF32.
jax.config.update("jax_enable_x64", True)
jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture
def getkey():
    """A fresh PRNG key on every call, deterministic per test."""
    state = [jax.random.key(0)]

    def _getkey():
        state[0], sub = jax.random.split(state[0])
        return sub

    return _getkey
