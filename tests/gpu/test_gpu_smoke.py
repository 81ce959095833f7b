"""On the GPU: the xla backend against the dense reference, in bfloat16."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eqx_flexattn as fa


@pytest.mark.gpu
def test_xla_matches_reference_bf16():
    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (
        jax.random.normal(key, (2, 4, 256, 64), jnp.float32).astype(jnp.bfloat16)
        for key in keys
    )
    bm = fa.create_block_mask(fa.masks.causal_mask, None, None, 256, 256)
    run = jax.jit(fa.flex_attention, static_argnames="backend")
    got = run(q, k, v, block_mask=bm, backend="xla")
    want = run(q, k, v, block_mask=bm, backend="reference")
    assert got.dtype == jnp.bfloat16 and got.devices() == q.devices()
    np.testing.assert_allclose(
        np.asarray(got, np.float32), np.asarray(want, np.float32), atol=2e-2
    )
