import os

import jax
import pytest


# Tests compare against float64 oracles; kernels run in Pallas interpret mode on CPU.
jax.config.update("jax_enable_x64", True)
os.environ.setdefault("EQX_FLEXATTN_INTERPRET", "1")


@pytest.fixture
def getkey():
    """A fresh PRNG key on every call, deterministic per test."""
    state = [jax.random.key(0)]

    def _getkey():
        state[0], sub = jax.random.split(state[0])
        return sub

    return _getkey
