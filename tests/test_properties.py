"""Property tests: random shapes, block sizes and mask/score-mod combinations."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from helpers import examples, numpy_attention, random_qkv
from hypothesis import given, settings, strategies as st

import eqx_flexattn as fa
from eqx_flexattn import masks, score_mods


MASKS = {
    "none": (None, None),
    "causal": (masks.causal_mask, lambda b, h, q, kv: q >= kv),
    "window": (masks.sliding_window(3), lambda b, h, q, kv: (q >= kv) & (q - kv <= 3)),
    "prefix_or_chunk": (
        fa.or_masks(masks.prefix_lm(4), masks.chunked(5)),
        lambda b, h, q, kv: (kv < 4) | (q >= kv) | (q // 5 == kv // 5),
    ),
    "per_head": (
        lambda b, h, q, kv: (q + kv + h) % 3 != 0,
        lambda b, h, q, kv: (q + kv + h) % 3 != 0,
    ),
    "batch_chunks": (
        lambda b, h, q, kv: (q + 3 * b) // 5 == (kv + 3 * b) // 5,
        lambda b, h, q, kv: (q + 3 * b) // 5 == (kv + 3 * b) // 5,
    ),
    "sparse_rows": (
        fa.and_masks(masks.causal_mask, lambda b, h, q, kv: q % 4 != 2),
        lambda b, h, q, kv: (q >= kv) & (q % 4 != 2),
    ),
}

SCORE_MODS = {
    "none": (None, None),
    "checkerboard": (
        score_mods.checkerboard,
        lambda s, b, h, q, kv: np.where(np.abs(q - kv) % 2 == 0, s, s / 2),
    ),
    "alibi_softcap": (
        score_mods.compose(
            score_mods.Alibi(jnp.array([0.5, 0.25, 0.125, 0.0625], jnp.float64)),
            score_mods.SoftCap(4.0),
        ),
        lambda s, b, h, q, kv: (
            4 * np.tanh((s + np.array([0.5, 0.25, 0.125, 0.0625])[h] * (kv - q)) / 4)
        ),
    ),
}


problems = st.fixed_dictionaries(
    dict(
        b=st.integers(1, 2),
        hkv=st.integers(1, 2),
        groups=st.integers(1, 2),
        lq=st.integers(1, 40),
        lkv=st.integers(1, 40),
        d=st.sampled_from([4, 8]),
        dv=st.sampled_from([4, 6]),
        block=st.tuples(st.sampled_from([4, 8, 16]), st.sampled_from([4, 8, 16])),
        mask=st.sampled_from(list(MASKS)),
        score=st.sampled_from(list(SCORE_MODS)),
        seed=st.integers(0, 2**16),
    )
)


def _setup(p):
    hq = p["hkv"] * p["groups"]
    q, k, v = random_qkv(
        jax.random.key(p["seed"]),
        p["b"],
        hq,
        p["hkv"],
        p["lq"],
        p["lkv"],
        p["d"],
        p["dv"],
    )
    mask_mod, np_mask = MASKS[p["mask"]]
    bm = None
    if mask_mod is not None:
        heads = hq if p["mask"] == "per_head" else None
        batch = p["b"] if p["mask"] == "batch_chunks" else None
        bm = fa.create_block_mask(
            mask_mod, batch, heads, p["lq"], p["lkv"], block_size=p["block"]
        )
    score_mod, np_score = SCORE_MODS[p["score"]]
    return q, k, v, bm, score_mod, np_mask, np_score


@settings(max_examples=examples(full=20, default=5))
@given(problems)
def test_xla_forward_matches_numpy(p):
    q, k, v, bm, score_mod, np_mask, np_score = _setup(p)
    # One compilation per example, rather than op-by-op dispatch.
    out, lse = eqx.filter_jit(fa.flex_attention)(
        q, k, v, score_mod, bm, enable_gqa=True, return_lse=True, backend="xla"
    )
    want_out, want_lse = numpy_attention(q, k, v, score_fn=np_score, mask_fn=np_mask)
    np.testing.assert_allclose(out, want_out, atol=1e-10, rtol=1e-10)
    np.testing.assert_allclose(lse, want_lse, atol=1e-10, rtol=1e-10)


@settings(max_examples=examples(full=8, default=3))
@given(problems)
def test_xla_gradients_match_reference(p):
    q, k, v, bm, score_mod, _, _ = _setup(p)

    def loss(args, backend):
        q, k, v, mod = args
        out = fa.flex_attention(q, k, v, mod, bm, enable_gqa=True, backend=backend)
        return jnp.sum(jnp.sin(out))

    args = (q, k, v, score_mod)
    got = eqx.filter_jit(eqx.filter_grad(loss))(args, "xla")
    want = eqx.filter_jit(eqx.filter_grad(loss))(args, "reference")
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        assert np.all(np.isfinite(g))
        np.testing.assert_allclose(g, w, atol=1e-10, rtol=1e-9)
