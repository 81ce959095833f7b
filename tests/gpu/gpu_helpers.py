"""Pieces the GPU tests of every kernel backend share."""

import jax
import jax.numpy as jnp
import numpy as np

from eqx_flexattn import score_mods


class LearnableBiases(score_mods.Alibi):
    """ALiBi slopes, a per-query bias and a relative-position table, all learnable:
    one score mod with a table of every kind whose gradient a kernel reduces."""

    bias: jax.Array
    relative: score_mods.RelativePositionBias

    def __init__(self, heads: int, length: int):
        self.slopes = jnp.linspace(0.05, 0.5, heads).astype(jnp.float32)
        self.bias = jnp.linspace(-0.5, 0.5, length).astype(jnp.float32)
        table = jax.random.normal(
            jax.random.key(6), (heads, 2 * length - 1), jnp.float32
        )
        self.relative = score_mods.RelativePositionBias(heads, length, table=table)

    def __call__(self, s, b, h, q, kv):
        s = super().__call__(s, b, h, q, kv) + self.bias[q]
        return self.relative(s, b, h, q, kv)


def assert_bitwise_repeatable(fn, *args, runs: int = 5):
    """`fn(*args)` gives identical bits (every leaf) in each of `runs` calls."""
    results = [jax.tree_util.tree_leaves(fn(*args)) for _ in range(runs)]
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
