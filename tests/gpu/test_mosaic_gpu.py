"""On the GPU: the `mosaic` backend's kernels at real tile sizes — against the `xla`
backend in float32, against PyTorch FlexAttention on identical inputs (when torch is
importable), and bitwise determinism of score-mod parameter gradients."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gpu_helpers import (
    assert_bitwise_repeatable,
    assert_matches_torch_alibi_causal,
    LearnableBiases,
)

import eqx_flexattn as fa
from eqx_flexattn import masks, score_mods


pytestmark = pytest.mark.gpu

L = 1024
H = 4
IDS = jnp.asarray((np.arange(L) * 5 // L).astype(np.int32))


def _mods():
    slopes = jnp.linspace(0.05, 0.5, H).astype(jnp.float32)
    table = jax.random.normal(jax.random.key(5), (H, 2 * L - 1), jnp.float32)
    relative = score_mods.RelativePositionBias(H, L, table=table)
    return {
        "causal": (masks.causal_mask, None),
        "alibi_causal": (masks.causal_mask, score_mods.Alibi(slopes)),
        "softcap_sliding": (masks.sliding_window(200), score_mods.SoftCap(20.0)),
        "document": (fa.and_masks(masks.causal_mask, masks.document_mask(IDS)), None),
        "head_bias_no_mask": (
            None,
            score_mods.HeadBias(jnp.linspace(-1, 1, H, dtype=jnp.float32)),
        ),
        # A "diag" table, constant (a closure) and learnable (its gradient from the
        # dK/dV kernel's diagonal sums).
        "relative_bias_causal": (masks.causal_mask, lambda *a: relative(*a)),
        "relative_bias_learnable": (None, relative),
        "t5_sliding": (
            masks.sliding_window(300),
            lambda *a: score_mods.T5RelativeBias(H, table=table[:, :32])(*a),
        ),
    }


def _inputs(seed, b=2, hq=H, hkv=H, lq=L, lkv=L, d=128, dtype=jnp.bfloat16):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (b, hq, lq, d), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (b, hkv, lkv, d), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (b, hkv, lkv, d), jnp.float32).astype(dtype)
    w = jax.random.normal(ks[3], (b, hq, lq, d), jnp.float32)
    return q, k, v, w


def _loss(backend, bm, w, gqa=False):
    def loss(q, k, v, mod):
        out, lse = fa.flex_attention(
            q, k, v, mod, bm, enable_gqa=gqa, return_lse=True, backend=backend
        )
        lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
        return jnp.sum(out.astype(jnp.float32) * w) + 0.1 * jnp.sum(lse**2)

    return loss


@pytest.mark.parametrize("name", list(_mods()))
def test_forward_and_gradients_match_xla(name):
    mask_mod, score_mod = _mods()[name]
    q, k, v, w = _inputs(0)
    bm = None if mask_mod is None else fa.create_block_mask(mask_mod, None, None, L, L)
    up = lambda x: x.astype(jnp.float32)
    if isinstance(score_mod, eqx.Module):  # learnable
        got = jax.jit(jax.grad(_loss("mosaic", bm, w), (0, 1, 2, 3)))(
            q, k, v, score_mod
        )
        want = jax.jit(jax.grad(_loss("xla", bm, w), (0, 1, 2, 3)))(
            up(q), up(k), up(v), score_mod
        )
    else:  # None, or a closure: constant

        def grads(backend, *qkv):
            loss = _loss(backend, bm, w)
            return jax.jit(jax.grad(lambda *a: loss(*a, score_mod), (0, 1, 2)))(*qkv)

        got = grads("mosaic", q, k, v)
        want = grads("xla", up(q), up(k), up(v))
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        a, b = np.asarray(up(a)), np.asarray(b)
        assert not np.isnan(a).any()
        assert np.linalg.norm(a - b) <= 1e-2 * np.linalg.norm(b)


def test_parameter_gradients_are_bitwise_deterministic():
    """Five runs of a learnable ALiBi + per-query bias + relative-position table mod
    give identical bits."""
    q, k, v, w = _inputs(1)
    bm = fa.create_block_mask(masks.causal_mask, None, None, L, L)
    grad = jax.jit(jax.grad(_loss("mosaic", bm, w), (0, 1, 2, 3)))
    assert_bitwise_repeatable(grad, q, k, v, LearnableBiases(H, L))


@pytest.mark.parametrize("name", ["clipped_relative", "t5"])
def test_bucketed_table_gradients_are_bitwise_deterministic(name):
    """Tables where many diagonals read one entry (a relative bias clipped at 128, T5
    buckets): the diagonal sums, and then the cotangents of the table entries that
    read one parameter (`_reduce.segment_sum`, no scatter-add), are summed in a
    fixed order (run five times, compared bit for bit)."""
    table = jax.random.normal(jax.random.key(7), (H, 255), jnp.float32)
    mod = {
        "clipped_relative": score_mods.RelativePositionBias(H, 128, table=table),
        "t5": score_mods.T5RelativeBias(H, table=table[:, :32]),
    }[name]
    q, k, v, w = _inputs(2)
    bm = fa.create_block_mask(masks.causal_mask, None, None, L, L)
    grad = jax.jit(jax.grad(_loss("mosaic", bm, w), 3))
    assert_bitwise_repeatable(grad, q, k, v, mod)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_matches_torch_flex_attention():
    """Same inputs, same mods: outputs, lse and gradients (learnable ALiBi slopes
    included) against torch.nn.attention.flex_attention."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch sees no GPU")
    lq = 512
    q, k, v, w = _inputs(2, b=1, lq=lq, lkv=lq)
    slopes = jnp.linspace(0.05, 0.5, H).astype(jnp.float32)
    bm = fa.create_block_mask(masks.causal_mask, None, None, lq, lq)

    def ours(q, k, v, slopes):
        out, lse = fa.flex_attention(
            q, k, v, score_mods.Alibi(slopes), bm, return_lse=True, backend="mosaic"
        )
        return out, lse

    assert_matches_torch_alibi_causal(ours, q, k, v, slopes, w[:, :, :lq], "bfloat16")
