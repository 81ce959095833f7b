import functools as ft
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import numpy_attention

import eqx_flexattn as fa
from eqx_flexattn import masks, score_mods
from eqx_flexattn.nn import apply_rotary, MultiheadFlexAttention


def _np_linear(lin: eqx.nn.Linear, x):
    """x (L, in) -> (L, out) with the layer's weights, in numpy."""
    y = np.asarray(x) @ np.asarray(lin.weight).T
    return y if lin.bias is None else y + np.asarray(lin.bias)


def _np_rotary(x, theta=10_000.0):
    """RoPE from its definition: rotate each pair (j, j + D/2) at row i by i*w_j."""
    x = np.asarray(x, np.float64)
    seq, heads, dim = x.shape
    out = np.empty_like(x)
    for i in range(seq):
        for j in range(dim // 2):
            angle = i * theta ** (-2 * j / dim)
            c, s = math.cos(angle), math.sin(angle)
            a, b = x[i, :, j], x[i, :, j + dim // 2]
            out[i, :, j] = c * a - s * b
            out[i, :, j + dim // 2] = s * a + c * b
    return out


def _np_layer(layer, query, key_, value, *, score_fn=None, mask_fn=None):
    """The layer computed by hand: numpy projections and numpy attention (float64)."""
    h, hkv = layer.num_heads, layer.num_kv_heads
    q = _np_linear(layer.query_proj, query).reshape(len(query), h, -1)
    k = _np_linear(layer.key_proj, key_).reshape(len(key_), hkv, -1)
    v = _np_linear(layer.value_proj, value).reshape(len(value), hkv, -1)
    if layer.rotary:
        q, k = _np_rotary(q, layer.rope_theta), _np_rotary(k, layer.rope_theta)
    q, k, v = (np.swapaxes(x, 0, 1)[None] for x in (q, k, v))
    out, _ = numpy_attention(
        q, k, v, score_fn=score_fn, mask_fn=mask_fn, scale=layer.scale
    )
    out = np.swapaxes(out[0], 0, 1).reshape(len(query), -1)
    return _np_linear(layer.output_proj, out)


def _inputs(getkey, lq, lkv, q_size, k_size=None, v_size=None):
    k_size = q_size if k_size is None else k_size
    v_size = q_size if v_size is None else v_size
    return (
        jax.random.normal(getkey(), (lq, q_size)),
        jax.random.normal(getkey(), (lkv, k_size)),
        jax.random.normal(getkey(), (lkv, v_size)),
    )


def _np_causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_matches_numpy(getkey, backend):
    slopes = jnp.array([0.5, 0.25, 0.125])
    layer = MultiheadFlexAttention(
        num_heads=3,
        query_size=12,
        key_size=10,
        value_size=7,
        output_size=5,
        qk_size=4,
        vo_size=6,
        use_query_bias=True,
        use_key_bias=True,
        use_value_bias=True,
        use_output_bias=True,
        score_mod=score_mods.Alibi(slopes),
        backend=backend,
        key=getkey(),
    )
    assert layer.query_proj.weight.dtype == jnp.float64
    query, key_, value = _inputs(getkey, 13, 13, 12, 10, 7)
    out = layer(query, key_, value, mask_mod=masks.causal_mask)
    assert out.shape == (13, 5) and out.dtype == jnp.float64

    def alibi(s, b, h, q_idx, kv_idx):
        return s + np.asarray(slopes)[h] * (kv_idx - q_idx)

    want = _np_layer(layer, query, key_, value, score_fn=alibi, mask_fn=_np_causal)
    np.testing.assert_allclose(out, want, rtol=1e-10, atol=1e-10)


def test_no_mask_cross_attention(getkey):
    layer = MultiheadFlexAttention(2, 8, scale=0.3, key=getkey())
    query, key_, value = _inputs(getkey, 5, 11, 8)
    out = layer(query, key_, value)
    np.testing.assert_allclose(
        out, _np_layer(layer, query, key_, value), rtol=1e-10, atol=1e-10
    )


def test_matches_equinox_multihead_attention(getkey):
    """Same weights, no score mod: the same numbers as eqx.nn.MultiheadAttention."""
    mk = getkey()
    ours = MultiheadFlexAttention(4, 16, use_query_bias=True, key=mk)
    theirs = eqx.nn.MultiheadAttention(4, 16, use_query_bias=True, key=mk)
    query, key_, value = _inputs(getkey, 9, 9, 16)
    causal = jnp.tril(jnp.ones((9, 9), bool))
    np.testing.assert_allclose(
        ours(query, key_, value, mask_mod=masks.causal_mask),
        theirs(query, key_, value, mask=causal),
        rtol=1e-10,
        atol=1e-10,
    )


@pytest.mark.parametrize("num_kv_heads", [1, 2])
def test_gqa(getkey, num_kv_heads):
    layer = MultiheadFlexAttention(
        4,
        16,
        num_kv_heads=num_kv_heads,
        score_mod=score_mods.checkerboard,
        key=getkey(),
    )
    assert layer.key_proj.out_features == num_kv_heads * 4
    assert layer.value_proj.out_features == num_kv_heads * 4
    query, key_, value = _inputs(getkey, 10, 10, 16)
    out = layer(query, key_, value, mask_mod=masks.sliding_window(3))

    def checkerboard(s, b, h, q_idx, kv_idx):
        return np.where((kv_idx - q_idx) % 2 == 0, s, 0.5 * s)

    def window(b, h, q_idx, kv_idx):
        return (q_idx - kv_idx >= 0) & (q_idx - kv_idx <= 3)

    want = _np_layer(layer, query, key_, value, score_fn=checkerboard, mask_fn=window)
    np.testing.assert_allclose(out, want, rtol=1e-10, atol=1e-10)


def test_rotary_matches_definition_and_equinox(getkey):
    x = jax.random.normal(getkey(), (7, 3, 8))
    np.testing.assert_allclose(apply_rotary(x), _np_rotary(x), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(
        apply_rotary(x, 500.0), _np_rotary(x, 500.0), rtol=1e-12, atol=1e-12
    )
    rope = eqx.nn.RotaryPositionalEmbedding(8, dtype=jnp.float64)
    np.testing.assert_allclose(
        apply_rotary(x),
        jax.vmap(rope, in_axes=1, out_axes=1)(x),
        rtol=1e-12,
        atol=1e-12,
    )
    assert apply_rotary(x.astype(jnp.float32)).dtype == jnp.float32


def test_rotary_layer(getkey):
    layer = MultiheadFlexAttention(
        2, 8, rotary=True, rope_theta=100, num_kv_heads=1, key=getkey()
    )
    assert layer.rope_theta == 100.0
    query, key_, value = _inputs(getkey, 12, 12, 8)
    out = layer(query, key_, value, mask_mod=masks.causal_mask)
    want = _np_layer(layer, query, key_, value, mask_fn=_np_causal)
    np.testing.assert_allclose(out, want, rtol=1e-10, atol=1e-10)


def test_rotary_relative(getkey):
    """<rope(q)_i, rope(k)_j> depends on i - j only."""
    q = jnp.broadcast_to(jax.random.normal(getkey(), (1, 1, 8)), (10, 1, 8))
    k = jnp.broadcast_to(jax.random.normal(getkey(), (1, 1, 8)), (10, 1, 8))
    s = jnp.einsum("qhd,khd->qk", apply_rotary(q), apply_rotary(k))
    for offset in range(-9, 10):
        diag = jnp.diagonal(s, offset)
        np.testing.assert_allclose(diag, diag[0], rtol=1e-10, atol=1e-10)


def test_block_mask_equals_mask_mod(getkey):
    mask = fa.and_masks(masks.causal_mask, masks.sliding_window(5))
    layer = MultiheadFlexAttention(2, 8, key=getkey(), block_size=4)
    query, key_, value = _inputs(getkey, 16, 16, 8)
    bm = fa.create_block_mask(mask, None, None, 16, 16, block_size=8)
    np.testing.assert_allclose(
        layer(query, key_, value, block_mask=bm),
        layer(query, key_, value, mask_mod=mask),
        rtol=1e-12,
        atol=1e-12,
    )
    # A block mask with one pattern per head.
    bm_h = fa.create_block_mask(
        lambda b, h, q, kv: (q >= kv) & (q - kv <= 2 * h + 1),
        None,
        2,
        16,
        16,
        block_size=4,
    )
    out = layer(query, key_, value, block_mask=bm_h)
    want = _np_layer(
        layer,
        query,
        key_,
        value,
        mask_fn=lambda b, h, q, kv: (q >= kv) & (q - kv <= 2 * h + 1),
    )
    np.testing.assert_allclose(out, want, rtol=1e-10, atol=1e-10)


def test_vmap_and_filter_jit(getkey):
    layer = MultiheadFlexAttention(
        4,
        16,
        num_kv_heads=2,
        rotary=True,
        score_mod=score_mods.RelativePositionBias(
            4, 6, key=getkey(), dtype=jnp.float64
        ),
        key=getkey(),
    )
    x = jax.random.normal(getkey(), (3, 10, 16))

    @eqx.filter_jit
    def forward(layer, x):
        call = ft.partial(layer, mask_mod=masks.causal_mask)
        return jax.vmap(call)(x, x, x)

    out = forward(layer, x)
    assert out.shape == (3, 10, 16)
    for i in range(3):
        np.testing.assert_allclose(
            out[i],
            layer(x[i], x[i], x[i], mask_mod=masks.causal_mask),
            rtol=1e-10,
            atol=1e-10,
        )
    # eqx.filter_vmap maps arrays only: the block mask passes through unbatched.
    bm = fa.create_block_mask(masks.causal_mask, None, None, 10, 10, block_size=4)
    out2 = eqx.filter_vmap(ft.partial(layer, block_mask=bm))(x, x, x)
    np.testing.assert_allclose(out2, out, rtol=1e-10, atol=1e-10)


def test_vmap_per_example_document_mask(getkey):
    """Document ids differ per example: the block mask is built inside vmap."""
    layer = MultiheadFlexAttention(2, 8, key=getkey(), block_size=4)
    x = jax.random.normal(getkey(), (2, 12, 8))
    ids = jnp.array([[0] * 5 + [1] * 7, [0] * 2 + [1] * 6 + [2] * 4])

    @eqx.filter_jit
    def forward(layer, x, ids):
        def one(x, ids):
            mask = fa.and_masks(masks.causal_mask, masks.document_mask(ids))
            return layer(x, x, x, mask_mod=mask)

        return jax.vmap(one)(x, ids)

    out = forward(layer, x, ids)
    for i in range(2):
        doc = np.asarray(ids[i])

        def mask_fn(b, h, q, kv, doc=doc):
            return (q >= kv) & (doc[q] == doc[kv])

        want = _np_layer(layer, x[i], x[i], x[i], mask_fn=mask_fn)
        np.testing.assert_allclose(out[i], want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    "make_mod",
    [
        lambda key: score_mods.Alibi(jnp.array([0.3, 0.2, 0.1, 0.05])),
        lambda key: score_mods.RelativePositionBias(4, 5, key=key, dtype=jnp.float64),
        lambda key: score_mods.compose(
            score_mods.HeadBias(jnp.zeros(4)),
            score_mods.T5RelativeBias(4, 8, 16, key=key, dtype=jnp.float64),
        ),
    ],
    ids=["alibi", "relative", "composed"],
)
def test_score_mod_gradients(getkey, make_mod):
    mod, layer_key = make_mod(getkey()), getkey()
    layer = MultiheadFlexAttention(4, 16, score_mod=mod, key=layer_key)
    ref_layer = MultiheadFlexAttention(
        4, 16, score_mod=mod, backend="reference", key=layer_key
    )
    x = jax.random.normal(getkey(), (2, 9, 16))
    target = jax.random.normal(getkey(), (2, 9, 16))

    def loss(layer):
        call = ft.partial(layer, mask_mod=masks.causal_mask)
        return jnp.mean((jax.vmap(call)(x, x, x) - target) ** 2)

    grads = eqx.filter_jit(eqx.filter_grad(loss))(layer)
    ref_grads = eqx.filter_grad(loss)(ref_layer)
    mod_leaves = jax.tree_util.tree_leaves(eqx.filter(grads.score_mod, eqx.is_array))
    assert mod_leaves
    for g in mod_leaves:
        assert jnp.all(jnp.isfinite(g))
    # HeadBias adds the same constant to every score of a row: softmax ignores it.
    assert any(float(jnp.abs(g).max()) > 1e-6 for g in mod_leaves)
    for g, r in zip(
        jax.tree_util.tree_leaves(eqx.filter(grads, eqx.is_array)),
        jax.tree_util.tree_leaves(eqx.filter(ref_grads, eqx.is_array)),
    ):
        np.testing.assert_allclose(g, r, rtol=1e-8, atol=1e-10)


def test_learns_alibi_slopes(getkey):
    """Data made by attention with known ALiBi slopes; the slopes are recovered."""
    true_slopes = jnp.array([1.0, 0.5, 0.25, 0.1])
    teacher = MultiheadFlexAttention(
        4, 16, score_mod=score_mods.Alibi(true_slopes), key=getkey()
    )
    x = jax.random.normal(getkey(), (16, 24, 16))
    bm = fa.create_block_mask(masks.causal_mask, None, None, 24, 24, block_size=8)

    def forward(layer, x):
        return jax.vmap(ft.partial(layer, block_mask=bm))(x, x, x)

    y = forward(teacher, x)
    student = eqx.tree_at(lambda m: m.score_mod.slopes, teacher, jnp.full((4,), 0.3))
    # Train the slopes only: the projections are those of the teacher.
    trainable = eqx.tree_at(
        lambda m: m.score_mod.slopes,
        jax.tree_util.tree_map(lambda _: False, student),
        True,
    )
    params, static = eqx.partition(student, trainable)
    optim = optax.adam(0.05)
    opt_state = optim.init(params)

    @eqx.filter_jit
    def step(params, opt_state):
        def loss(params):
            return jnp.mean((forward(eqx.combine(params, static), x) - y) ** 2)

        value, grads = eqx.filter_value_and_grad(loss)(params)
        updates, opt_state = optim.update(grads, opt_state, params)
        return eqx.apply_updates(params, updates), opt_state, value

    losses = []
    for _ in range(300):
        params, opt_state, value = step(params, opt_state)
        losses.append(float(value))
    learned = eqx.combine(params, static).score_mod.slopes
    assert losses[-1] < 1e-3 * losses[0]
    np.testing.assert_allclose(learned, true_slopes, atol=0.02)


def test_optax_full_training_step(getkey):
    """Every parameter (projections and a relative bias) updates through optax."""
    layer = MultiheadFlexAttention(
        2,
        8,
        num_kv_heads=1,
        rotary=True,
        score_mod=score_mods.RelativePositionBias(2, 4, dtype=jnp.float64),
        key=getkey(),
    )
    x = jax.random.normal(getkey(), (4, 8, 8))
    optim = optax.sgd(0.1)
    opt_state = optim.init(eqx.filter(layer, eqx.is_inexact_array))

    @eqx.filter_jit
    def step(layer, opt_state):
        def loss(layer):
            out = jax.vmap(ft.partial(layer, mask_mod=masks.causal_mask))(x, x, x)
            return jnp.mean((out - x) ** 2)

        value, grads = eqx.filter_value_and_grad(loss)(layer)
        updates, opt_state = optim.update(grads, opt_state)
        return eqx.apply_updates(layer, updates), opt_state, value

    new, _, _ = step(layer, opt_state)
    for old_leaf, new_leaf in zip(
        jax.tree_util.tree_leaves(eqx.filter(layer, eqx.is_inexact_array)),
        jax.tree_util.tree_leaves(eqx.filter(new, eqx.is_inexact_array)),
    ):
        assert not np.allclose(old_leaf, new_leaf)


def test_float32(getkey):
    layer = MultiheadFlexAttention(
        2,
        8,
        dtype=jnp.float32,
        score_mod=score_mods.generate_alibi_bias(2),
        key=getkey(),
    )
    x = jax.random.normal(getkey(), (6, 8), jnp.float32)
    out = layer(x, x, x, mask_mod=masks.causal_mask)
    assert out.dtype == jnp.float32
    want = _np_layer(
        layer,
        x,
        x,
        x,
        mask_fn=_np_causal,
        score_fn=lambda s, b, h, q, kv: (
            s + np.asarray(layer.score_mod.slopes, np.float64)[h] * (kv - q)
        ),
    )
    np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-5)


def test_errors(getkey):
    with pytest.raises(ValueError, match="multiple of `num_kv_heads`"):
        MultiheadFlexAttention(4, 16, num_kv_heads=3, key=getkey())
    with pytest.raises(ValueError, match="even `qk_size`"):
        MultiheadFlexAttention(2, 16, qk_size=5, rotary=True, key=getkey())
    with pytest.raises(TypeError, match="score_mod"):
        MultiheadFlexAttention(2, 16, score_mod=3.0, key=getkey())
    layer = MultiheadFlexAttention(2, 8, key=getkey())
    x = jnp.ones((5, 8))
    bm = fa.create_block_mask(masks.causal_mask, None, None, 5, 5)
    with pytest.raises(ValueError, match="not both"):
        layer(x, x, x, block_mask=bm, mask_mod=masks.causal_mask)
    with pytest.raises(ValueError, match="block_mask"):
        layer(
            x,
            x,
            x,
            block_mask=fa.create_block_mask(masks.causal_mask, None, None, 6, 6),
        )


def test_dense_mask_points_to_mask_mod_and_block_mask(getkey):
    layer = MultiheadFlexAttention(2, 8, key=getkey())
    x = jnp.ones((5, 8))
    with pytest.raises(TypeError, match="takes no dense `mask`") as info:
        layer(x, x, x, mask=jnp.tril(jnp.ones((5, 5), bool)))
    assert "mask_mod=" in str(info.value) and "block_mask=" in str(info.value)
    # The advised spelling of the same dense mask gives eqx.nn's result.
    dense = (
        jnp.asarray(np.random.default_rng(0).random((5, 5)) < 0.6).at[:, 0].set(True)
    )
    mk = getkey()
    ours = MultiheadFlexAttention(2, 8, key=mk)
    theirs = eqx.nn.MultiheadAttention(2, 8, key=mk)
    y = jax.random.normal(getkey(), (5, 8))
    np.testing.assert_allclose(
        ours(y, y, y, mask_mod=lambda b, h, q_idx, kv_idx: dense[q_idx, kv_idx]),
        theirs(y, y, y, mask=dense),
        rtol=1e-10,
        atol=1e-10,
    )


def test_shape_errors_without_typechecker(getkey):
    """Without the jaxtyping hook the layer's own checks raise ValueErrors."""
    layer = MultiheadFlexAttention(2, 8, key=getkey())
    x = jnp.ones((5, 8))
    call = getattr(layer.__call__, "__wrapped__", None)
    if call is None:  # not instrumented by a typechecker
        call = layer.__call__
    else:
        call = ft.partial(call, layer)
    with pytest.raises(ValueError, match=r"`query` must have shape \(seq, 8\)"):
        call(jnp.ones((5, 7)), x, x)
    with pytest.raises(ValueError, match="use jax.vmap"):
        call(jnp.ones((2, 5, 8)), x, x)
    with pytest.raises(ValueError, match="same length"):
        call(x, x, jnp.ones((6, 8)))
