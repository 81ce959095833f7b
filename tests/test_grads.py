"""Gradients of q, k, v and score-mod parameters: finite differences and reference."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import backend_params, random_qkv, to_f64

import eqx_flexattn as fa
from eqx_flexattn import masks, score_mods


KERNEL_BACKENDS = backend_params(reference=False)
ALL_BACKENDS = backend_params()


def loss_fn(backend, block_mask, enable_gqa=False):
    """A scalar touching out and lse, with cotangents of both signs."""

    def loss(q, k, v, mod):
        out, lse = fa.flex_attention(
            q,
            k,
            v,
            mod,
            block_mask,
            enable_gqa=enable_gqa,
            return_lse=True,
            backend=backend,
        )
        w = jnp.cos(jnp.arange(out.size, dtype=jnp.float32)).reshape(out.shape)
        finite = jnp.isfinite(lse)
        return jnp.sum(w.astype(lse.dtype) * out.astype(lse.dtype)) + 0.3 * jnp.sum(
            jnp.where(finite, lse, 0.0) ** 2
        )

    return loss


def finite_difference_check(f, args, key, eps=1e-6, rtol=1e-6):
    """<grad f, u> against a central difference along a random direction u."""
    params, static = eqx.partition(args, eqx.is_inexact_array)
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(key, len(leaves))
    u = jax.tree_util.tree_unflatten(
        tree, [jax.random.normal(kk, x.shape, x.dtype) for kk, x in zip(keys, leaves)]
    )
    f = eqx.filter_jit(f)  # one compilation instead of op-by-op dispatch
    g = eqx.filter_jit(eqx.filter_grad(lambda p: f(*eqx.combine(p, static))))(params)
    directional = sum(
        jnp.vdot(a, b)
        for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(u))
    )
    shift = lambda s: jax.tree_util.tree_map(lambda p, d: p + s * d, params, u)
    numeric = (
        f(*eqx.combine(shift(eps), static)) - f(*eqx.combine(shift(-eps), static))
    ) / (2 * eps)
    np.testing.assert_allclose(directional, numeric, rtol=rtol, atol=1e-7)


MODS = {
    "alibi": lambda key, h: score_mods.Alibi(jnp.linspace(0.1, 0.5, h)),
    "relative_bias": lambda key, h: score_mods.RelativePositionBias(h, 12, key=key),
    "t5": lambda key, h: score_mods.T5RelativeBias(h, 8, 20, key=key),
    "head_bias_softcap": lambda key, h: score_mods.compose(
        score_mods.HeadBias(jnp.linspace(-1, 1, h)), score_mods.SoftCap(2.0)
    ),
}


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("mod_name", list(MODS))
def test_finite_differences(backend, mod_name, getkey):
    q, k, v = random_qkv(getkey(), 1, 2, 2, 21, 27, 8, 6)
    bm = fa.create_block_mask(masks.causal_mask, None, None, 21, 27, block_size=8)
    mod = to_f64(MODS[mod_name](getkey(), 2))
    finite_difference_check(loss_fn(backend, bm), (q, k, v, mod), getkey())


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_finite_differences_gqa_head_mask(backend, getkey):
    """An independent check of the block logic: per-head, per-batch mask with fully
    masked rows, GQA, ragged lengths and unequal block sizes."""
    b, hq, hkv, lq, lkv = 2, 4, 2, 19, 26
    q, k, v = random_qkv(getkey(), b, hq, hkv, lq, lkv, 8, 4)
    ids = jnp.array([[0] * 9 + [1] * 17, [0] * 20 + [1] * 6])

    def mask(bb, h, qi, kv):
        same_doc = ids[bb, qi] == ids[bb, kv]
        return same_doc & (jnp.abs(qi - kv) <= 4 + 3 * h) & ((qi + h) % 5 != 0)

    bm = fa.create_block_mask(mask, b, hq, lq, lkv, block_size=(4, 8))
    mod = to_f64(MODS["relative_bias"](getkey(), hq))
    finite_difference_check(loss_fn(backend, bm, True), (q, k, v, mod), getkey())


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("mod_name", list(MODS))
def test_matches_reference_gradients(backend, mod_name, getkey):
    """GQA, ragged lengths, per-head mask with fully masked rows, every mod."""
    b, hq, hkv, lq, lkv = 2, 4, 2, 30, 45
    q, k, v = random_qkv(getkey(), b, hq, hkv, lq, lkv, 8, 4)
    mod_mask = lambda bb, h, qi, kv: (
        (jnp.abs(qi - kv) <= 6 + 5 * h) & ((qi + h) % 5 != 0)
    )
    bm = fa.create_block_mask(mod_mask, None, hq, lq, lkv, block_size=(8, 16))
    mod = to_f64(MODS[mod_name](getkey(), hq))
    args = (q, k, v, mod)
    grad = lambda name: eqx.filter_jit(
        eqx.filter_grad(lambda a: loss_fn(name, bm, True)(*a))
    )
    got, want = grad(backend)(args), grad("reference")(args)
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        assert np.all(np.isfinite(g))
        np.testing.assert_allclose(g, w, atol=1e-10, rtol=1e-9)
    # The parameters really are learned: their gradient is not zero.
    assert any(
        np.abs(x).max() > 1e-3
        for x in jax.tree_util.tree_leaves(eqx.filter(got[3], eqx.is_inexact_array))
    )


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_closure_captured_array_gets_gradient(backend, getkey):
    q, k, v = random_qkv(getkey(), 1, 2, 2, 16, 16, 8)

    def loss(bias):
        mod = lambda s, b, h, qi, kv: s + bias[h] * (qi - kv) / 16
        return jnp.sum(fa.flex_attention(q, k, v, mod, backend=backend) ** 2)

    bias = jnp.array([0.3, -0.7])
    g = jax.jit(jax.grad(loss))(bias)
    eps = 1e-6
    for i in range(2):
        e = jnp.zeros(2).at[i].set(eps)
        np.testing.assert_allclose(
            g[i], (loss(bias + e) - loss(bias - e)) / (2 * eps), rtol=1e-6
        )


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_fully_masked_rows_have_zero_gradient(backend, getkey):
    mod = lambda b, h, q, kv: (q % 3 != 1) & (kv <= q)
    bm = fa.create_block_mask(mod, None, None, 24, 24, block_size=8)
    q, k, v = random_qkv(getkey(), 1, 2, 2, 24, 24, 8)
    alibi = to_f64(score_mods.generate_alibi_bias(2))
    grads = eqx.filter_grad(lambda a: loss_fn(backend, bm)(*a))((q, k, v, alibi))
    for g in jax.tree_util.tree_leaves(grads):
        assert np.all(np.isfinite(g))
    np.testing.assert_array_equal(np.asarray(grads[0])[:, :, 1::3], 0.0)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_partial_differentiation(backend, getkey):
    """Only some inputs differentiated: the rest are skipped, results unchanged."""
    q, k, v = random_qkv(getkey(), 1, 2, 2, 16, 16, 8)
    alibi = to_f64(score_mods.generate_alibi_bias(2))
    loss = loss_fn(backend, None)
    full = jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, alibi)
    np.testing.assert_allclose(jax.grad(loss, argnums=0)(q, k, v, alibi), full[0])
    np.testing.assert_allclose(jax.grad(loss, argnums=2)(q, k, v, alibi), full[2])
    g = jax.grad(loss, argnums=3)(q, k, v, alibi)
    np.testing.assert_allclose(g.slopes, full[3].slopes)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_low_precision_gradients(dtype, getkey):
    q, k, v = random_qkv(getkey(), 1, 2, 2, 32, 32, 16, dtype=dtype)
    bm = fa.create_block_mask(masks.causal_mask, None, None, 32, 32, block_size=16)
    alibi = score_mods.generate_alibi_bias(2)
    grad = lambda name: jax.jit(jax.grad(loss_fn(name, bm), argnums=(0, 1, 2, 3)))
    got = grad("xla")(q, k, v, alibi)
    up = lambda x: x.astype(jnp.float64)
    want = grad("reference")(up(q), up(k), up(v), to_f64(alibi))
    tol = 1e-4 if dtype == jnp.float32 else 5e-2
    assert [g.dtype for g in got[:3]] == [dtype] * 3
    assert got[3].slopes.dtype == jnp.float32
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(
            np.asarray(g, np.float64), w, atol=tol * np.abs(w).max(), rtol=0
        )


def test_low_precision_parameter_gradients_accumulate_in_float32(getkey):
    """A bfloat16 bias table: each entry's gradient sums hundreds of tile elements;
    summed in bfloat16 the largest was off by several percent (67% at L=1024)."""
    L = 256
    q, k, v = random_qkv(getkey(), 1, 1, 1, L, L, 8, dtype=jnp.float32)
    bm = fa.create_block_mask(masks.causal_mask, None, None, L, L, block_size=16)
    table = 0.02 * jax.random.normal(getkey(), (1, 127), jnp.float32)
    mod = score_mods.RelativePositionBias(1, 64, table=table.astype(jnp.bfloat16))
    grad = lambda name, mod, *qkv: (
        jax.jit(jax.grad(lambda m: loss_fn(name, bm)(*qkv, m)))(mod).table
    )
    got = grad("xla", mod, q, k, v)
    want = grad("reference", to_f64(mod), *map(to_f64, (q, k, v)))
    assert got.dtype == jnp.bfloat16
    # bfloat16 rounding of the result alone is 2**-9 relative.
    np.testing.assert_allclose(
        np.asarray(got, np.float64), want, atol=5e-3 * np.abs(want).max(), rtol=0
    )


def test_second_derivatives(getkey):
    """Forward-over-reverse works under jit; reverse-over-reverse works eagerly and
    under jit raises an error naming flex_attention and what works."""
    q, k, v = random_qkv(getkey(), 1, 1, 1, 8, 8, 4)
    alibi = to_f64(score_mods.generate_alibi_bias(1))

    def f(q, backend):
        return jnp.sum(fa.flex_attention(q, k, v, alibi, backend=backend) ** 3)

    def gg(q, backend):
        return jnp.sum(jax.grad(f)(q, backend) ** 2)

    want = jax.jit(jax.grad(gg), static_argnums=1)(q, "reference")
    np.testing.assert_allclose(jax.grad(gg)(q, "xla"), want, rtol=1e-9, atol=1e-12)
    with pytest.raises(NotImplementedError, match=r"flex_attention: .*jax.hessian"):
        jax.jit(jax.grad(gg), static_argnums=1)(q, "xla")
    hessian = jax.jit(jax.hessian(f), static_argnums=1)
    np.testing.assert_allclose(
        hessian(q, "xla"), hessian(q, "reference"), rtol=1e-9, atol=1e-12
    )


@pytest.mark.parametrize(
    "dtype, slope_dtype", [(jnp.bfloat16, jnp.bfloat16), (jnp.float64, jnp.float32)]
)
def test_parameters_narrower_than_the_accumulator(dtype, slope_dtype, getkey):
    """ALiBi slopes narrower than the gradient accumulator (bfloat16 slopes with
    bfloat16 inputs; float32 slopes with float64 inputs), whose program multiplies
    the slope by a position cast to the slope's dtype: the xla backward gives the
    reference's gradients, in the slopes' dtype."""
    q, k, v = random_qkv(getkey(), 1, 2, 2, 32, 32, 16, dtype=dtype)
    bm = fa.create_block_mask(masks.causal_mask, None, None, 32, 32, block_size=16)
    alibi = score_mods.Alibi(jnp.array([0.5, 0.25], slope_dtype))
    grad = lambda name, *a: jax.jit(jax.grad(loss_fn(name, bm), argnums=3))(*a)
    got = grad("xla", q, k, v, alibi).slopes
    want = grad("reference", *map(to_f64, (q, k, v, alibi))).slopes
    assert got.dtype == slope_dtype
    tol = 5e-2 if dtype == jnp.bfloat16 else 1e-5
    np.testing.assert_allclose(
        np.asarray(got, np.float64), want, atol=tol * np.abs(want).max(), rtol=0
    )
