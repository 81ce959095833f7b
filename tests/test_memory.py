"""O(L) memory: the compiled xla backend never allocates an L x L array."""

import jax
import jax.numpy as jnp

import eqx_flexattn as fa
from eqx_flexattn import masks, score_mods


def test_forward_backward_temporary_memory_is_linear():
    L, D = 16384, 64
    bm = fa.create_block_mask(masks.causal_mask, None, None, L, L)
    x = jax.ShapeDtypeStruct((1, 1, L, D), jnp.float32)
    alibi = score_mods.generate_alibi_bias(1)

    def loss(q, k, v, mod, bm):
        return fa.flex_attention(q, k, v, mod, bm, backend="xla").sum()

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
    stats = grad.lower(x, x, x, alibi, bm).compile().memory_analysis()
    one_score_matrix = L * L * 4  # 1 GiB
    assert stats.temp_size_in_bytes < one_score_matrix / 8, stats
