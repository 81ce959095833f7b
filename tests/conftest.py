import jax
import pytest


# Tests compare against float64 oracles.
jax.config.update("jax_enable_x64", True)


@pytest.fixture
def getkey():
    """A fresh PRNG key on every call, deterministic per test."""
    state = [jax.random.key(0)]

    def _getkey():
        state[0], sub = jax.random.split(state[0])
        return sub

    return _getkey
