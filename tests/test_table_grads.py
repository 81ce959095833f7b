"""Score-mod parameter gradients from kernel-style partials (`_backends._reduce`):
dS taken densely from the reference backend, summed per program as a kernel would,
reduced and mapped back to the mod's arrays, against autodiff of the reference."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_qkv

import eqx_flexattn as fa
from eqx_flexattn import score_mods
from eqx_flexattn._backends._reduce import (
    diagonal_partials,
    reduce_table_grads,
    segment_sum,
    table_vjp,
)
from eqx_flexattn._mods import (
    convert_score_mod,
    diag_index,
    index_grid,
    kernel_mod,
    OperandSpec,
)


B, HQ, HKV, LQ, LKV, D = 2, 4, 2, 19, 26, 8
BQ, BKV = 8, 16  # the tiles of the imagined kernel
LQ_PAD, LKV_PAD = 24, 32
NQ, NKV = LQ_PAD // BQ, LKV_PAD // BKV


class _Biases(eqx.Module):
    """Every table kind, soft-capped so the mod's VJP depends on the score: ALiBi
    slopes (scalar, per head), a per-(batch, query) bias, a per-key bias shared by
    batches and heads, and document ids (an integer table: no gradient)."""

    slopes: jax.Array  # (HQ,)
    q_bias: jax.Array  # (B, LQ)
    kv_bias: jax.Array  # (LKV,)
    ids: jax.Array  # (B, LKV) int32

    def __call__(self, s, b, h, q, kv):
        s = s + self.slopes[h] * (kv - q) + self.q_bias[b, q] + self.kv_bias[kv]
        s = s + 0.5 * (self.ids[b, kv] == 0).astype(s.dtype)
        return 4.0 * jnp.tanh(s / 4.0)


def _mods(key):
    k1, k2, k3 = jax.random.split(key, 3)
    normal = lambda k, shape: 0.3 * jax.random.normal(k, shape, jnp.float32)
    ids = jnp.array([[0] * 9 + [1] * 17, [0] * 20 + [1] * 6], jnp.int32)
    return {
        "alibi": score_mods.Alibi(jnp.linspace(0.1, 0.5, HQ, dtype=jnp.float32)),
        "biases": _Biases(
            normal(k1, (HQ,)), normal(k2, (B, LQ)), normal(k3, (LKV,)), ids
        ),
    }


def _mask(b, h, q, kv):
    return (jnp.abs(q - kv) <= 5 + 4 * h) & ((q + h) % 7 != 0)


def _loss(q, k, v, mod, bm):
    out, lse = fa.flex_attention(
        q, k, v, mod, bm, enable_gqa=True, return_lse=True, backend="reference"
    )
    w = jnp.cos(jnp.arange(out.size, dtype=out.dtype)).reshape(out.shape)
    return jnp.sum(w * out) + 0.3 * jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0) ** 2)


def _dense_ds(q, k, v, mod, bm):
    """dL/dS (B, HQ, LQ, LKV): the loss's gradient with respect to the scores the
    softmax sees (after the score mod), from the reference backend."""

    def loss(e):
        with_e = lambda s, b, h, qi, kv: mod(s, b, h, qi, kv) + e[b, h, qi, kv]
        return _loss(q, k, v, with_e, bm)

    return jax.grad(loss)(jnp.zeros((B, HQ, LQ, LKV), q.dtype))


def _partials(km, raw, ds):
    """What a kernel writes, per table: the VJP of the mod's arithmetic with respect
    to each floating table value on every element, summed over the tile's axes the
    table does not have, one sum per program. Programs are (batch, query head, key
    block) as in a dk/dv pass: scalar tables (B, H, NKV), "q" tables a column per
    program (B, H, NKV, LQ_PAD), "kv" tables full rows (B, H, LKV_PAD)."""
    grid = index_grid(B, HQ, LQ, LKV)
    dense = lambda table, spec: jnp.broadcast_to(
        {
            "scalar": lambda: table[:, :, None, None],
            "q": lambda: table[:, :, :LQ, None],
            "kv": lambda: table[:, :, None, :LKV],
        }[spec.kind](),
        (B, HQ, LQ, LKV),
    )
    values = [dense(t, s) for t, s in zip(km.tables, km.specs)]
    floating = [i for i, t in enumerate(km.tables) if t.dtype == jnp.float32]

    def apply(*wrt):
        vals = list(values)
        for i, x in zip(floating, wrt):
            vals[i] = x
        return km.apply(raw.astype(jnp.float32), *grid, *vals)

    _, vjp = jax.vjp(apply, *(values[i] for i in floating))
    dvalues = dict(zip(floating, vjp(ds.astype(jnp.float32))))
    partials = []
    for i, spec in enumerate(km.specs):
        if i not in dvalues:
            partials.append(None)
            continue
        d = jnp.pad(dvalues[i], [(0, 0), (0, 0), (0, LQ_PAD - LQ), (0, LKV_PAD - LKV)])
        tiles = d.reshape(B, HQ, NQ, BQ, NKV, BKV)
        if spec.kind == "scalar":
            partials.append(tiles.sum(axis=(2, 3, 5)))
        elif spec.kind == "q":
            column = tiles.sum(axis=5).reshape(B, HQ, LQ_PAD, NKV)
            partials.append(jnp.moveaxis(column, 3, 2))
        else:
            partials.append(d.sum(axis=2))
    return partials


@pytest.mark.parametrize("name", ["alibi", "biases"])
def test_table_grads_match_reference_autodiff(name, getkey):
    q, k, v = random_qkv(getkey(), B, HQ, HKV, LQ, LKV, D, 4)
    bm = fa.create_block_mask(_mask, None, HQ, LQ, LKV, block_size=(BQ, BKV))
    mod = _mods(getkey())[name]
    want = eqx.filter_grad(lambda m: _loss(q, k, v, m, bm))(mod)

    ds = _dense_ds(q, k, v, mod, bm)
    raw = jnp.einsum("bhqd,bhkd->bhqk", q, jnp.repeat(k, HQ // HKV, axis=1)) / np.sqrt(
        D
    )
    converted, to_user = eqx.filter_vjp(
        lambda m: convert_score_mod(m, jnp.float32), mod
    )
    build = lambda m: kernel_mod(m, B, HQ, LQ, LKV, lq_pad=LQ_PAD, lkv_pad=LKV_PAD)
    km = build(converted)
    partials = _partials(km, raw, ds)
    table_grads = reduce_table_grads(partials, km.specs, km.tables)
    for g, t in zip(table_grads, km.tables):
        if t.dtype == jnp.int32:
            assert g is None
        else:
            assert g.shape == t.shape and g.dtype == jnp.float32
    (got,) = to_user(table_vjp(build, converted, table_grads))

    want_leaves = jax.tree_util.tree_leaves(eqx.filter(want, eqx.is_inexact_array))
    got_leaves = jax.tree_util.tree_leaves(eqx.filter(got, eqx.is_inexact_array))
    assert len(got_leaves) == len(want_leaves) > 0
    for g, w in zip(got_leaves, want_leaves):
        assert g.shape == w.shape and g.dtype == w.dtype == jnp.float32
        w = np.asarray(w, np.float64)
        assert np.abs(w).max() > 1e-3
        np.testing.assert_allclose(g, w, atol=1e-5 * np.abs(w).max(), rtol=0)


def test_reduce_sums_programs_and_broadcast_axes():
    """Exact sums over program axes and the batch/head axes a table lacks;
    deterministic; integer tables get None."""
    specs = (
        OperandSpec("scalar", False, True, jnp.float32),
        OperandSpec("q", True, False, jnp.float32),
        OperandSpec("kv", False, False, jnp.float32),
        OperandSpec("kv", True, False, jnp.int32),
    )
    tables = (
        jnp.zeros((1, 3), jnp.float32),
        jnp.zeros((2, 1, 8), jnp.float32),
        jnp.zeros((1, 1, 16), jnp.float32),
        jnp.zeros((2, 1, 16), jnp.int32),
    )
    rng = np.random.default_rng(0)
    # Integers in float32: every sum is exact, whatever the order.
    partials = (
        rng.integers(-9, 9, (2, 3, 4, 5)).astype(np.float32),
        rng.integers(-9, 9, (2, 3, 2, 8)).astype(np.float32),
        rng.integers(-9, 9, (2, 3, 16)).astype(np.float32),
        None,
    )
    got = reduce_table_grads(
        tuple(None if p is None else jnp.asarray(p) for p in partials), specs, tables
    )
    np.testing.assert_array_equal(got[0], partials[0].sum(axis=(0, 2, 3))[None])
    np.testing.assert_array_equal(got[1], partials[1].sum(axis=(1, 2))[:, None])
    np.testing.assert_array_equal(got[2], partials[2].sum(axis=(0, 1))[None, None])
    assert got[3] is None
    assert all(g.dtype == jnp.float32 for g in got[:3])
    # Run to run, the same shapes give the same bits (here on inexact sums).
    noisy = tuple(
        None if p is None else jnp.asarray(p + rng.random(p.shape), jnp.float32)
        for p in partials
    )
    reduce = jax.jit(lambda p: reduce_table_grads(p, specs, tables))
    for a, b in zip(reduce(noisy)[:3], reduce(noisy)[:3]):
        np.testing.assert_array_equal(a, b)


def test_reduce_rejects_misshapen_partials():
    spec = OperandSpec("q", True, True, jnp.float32)
    table = jnp.zeros((2, 3, 8), jnp.float32)
    with pytest.raises(ValueError, match="does not fit a 'q' table"):
        reduce_table_grads((jnp.zeros((2, 3, 4, 7)),), (spec,), (table,))
    with pytest.raises(ValueError, match="must be None"):
        int_spec = OperandSpec("q", True, True, jnp.int32)
        reduce_table_grads(
            (jnp.zeros((2, 3, 8)),), (int_spec,), (table.astype(jnp.int32),)
        )


def test_table_vjp_low_precision_leaf():
    """A bfloat16 leaf: the VJP runs in float32 and is cast to bfloat16 once."""
    bias = jnp.array([0.5, -1.0, 2.0, 3.0], jnp.bfloat16)
    mod = convert_score_mod(score_mods.HeadBias(bias), jnp.float32)
    build = lambda m: kernel_mod(m, B, HQ, LQ, LKV, lq_pad=LQ_PAD, lkv_pad=LKV_PAD)
    g = jnp.arange(HQ, dtype=jnp.float32)[None] + 1 / 3
    (got,) = jax.tree_util.tree_leaves(table_vjp(build, mod, (g,)))
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(got, g[0].astype(jnp.bfloat16))


def test_diagonal_partials_place_every_tile_on_its_diagonals():
    """Per-tile diagonal sums land on the table entries of their diagonals
    (`diag_index`), visited tiles only, against a loop over dense 64x64 tiles."""
    b, h, mq, nkt = 2, 3, 3, 4  # Lq_pad 192, Lkv_pad 256
    lq_pad, lkv_pad = 64 * mq, 64 * nkt
    rng = np.random.default_rng(0)
    tiles = rng.normal(size=(b, h, nkt, mq, 64, 64))  # [.., kt, qt, key, query]
    visited = rng.random((1, h, nkt, mq)) < 0.6
    # What the dK/dV kernel writes: u[x] sums the tile's r - c == 64 - x.
    r, c = np.arange(64)[:, None], np.arange(64)[None, :]
    partials = np.zeros((b, h, nkt, mq, 128))
    for x in range(1, 128):
        partials[..., x] = np.where(r - c == 64 - x, tiles, 0).sum(axis=(-2, -1))
    partials = np.where(visited[..., None], partials, np.nan)  # garbage elsewhere
    want = np.zeros((b, h, lq_pad + lkv_pad - 1))
    for kt in range(nkt):
        for qt in range(mq):
            ok = visited[0, :, kt, qt][None, :, None, None]
            tile = np.where(ok, tiles[:, :, kt, qt], 0)
            for key in range(64):
                n = diag_index(64 * qt + np.arange(64), 64 * kt + key, lq_pad)
                want[:, :, n] += tile[:, :, key]
    partials, visited = jnp.asarray(partials), jnp.asarray(visited)
    per_head = OperandSpec("diag", False, True, jnp.float32)
    got = diagonal_partials(partials, visited, lq_pad, per_head)
    np.testing.assert_allclose(got, want.sum(0, keepdims=True), rtol=1e-5, atol=1e-5)
    every = OperandSpec("diag", True, True, jnp.float32)
    got = diagonal_partials(partials, visited, lq_pad, every)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)  # float32
    with pytest.raises(ValueError, match="do not fit"):
        diagonal_partials(partials, visited, lq_pad + 64, every)


@pytest.mark.parametrize("seed", range(4))
def test_segment_sum_matches_numpy(seed):
    """Sums per segment (out-of-range segments dropped) against `np.add.at`:
    exactly for integer-valued floats, to rounding for others; same bits twice."""
    rng = np.random.default_rng(seed)
    n, num = int(rng.integers(1, 300)), int(rng.integers(1, 40))
    segments = rng.integers(-3, num + 3, n).astype(np.int32)
    whole = rng.integers(-50, 50, n).astype(np.float32)
    want = np.zeros(num, np.float64)
    ok = (segments >= 0) & (segments < num)
    np.add.at(want, segments[ok], whole[ok])
    summed = jax.jit(segment_sum, static_argnums=2)
    np.testing.assert_array_equal(summed(whole, segments, num), want)
    values = rng.normal(size=n).astype(np.float32)
    want = np.zeros(num, np.float64)
    np.add.at(want, segments[ok], values[ok].astype(np.float64))
    got = summed(values, segments, num)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got, summed(values, segments, num))


def test_segment_sum_edges():
    assert (
        segment_sum(jnp.zeros((0,)), jnp.zeros((0,), jnp.int32), 3).tolist()
        == [0.0] * 3
    )


def _clipped_relative(key):
    return score_mods.RelativePositionBias(HQ, 6, key=key)


def _t5(key):
    return score_mods.T5RelativeBias(HQ, num_buckets=8, max_distance=16, key=key)


class _ScaledIndex(eqx.Module):
    """A lookup whose index is computed from a float parameter: its table is not a
    plain selection of the parameters, so `table_vjp` takes `jax.vjp`."""

    bias: jax.Array  # (HQ, 4)
    shift: jax.Array  # () float

    def __call__(self, s, b, h, q, kv):
        return s + self.bias[h, (self.shift > 0).astype(jnp.int32) + (kv - q > 0)]


@pytest.mark.parametrize("name", ["clipped_relative", "t5", "scaled_index"])
def test_table_vjp_sums_shared_entries_in_a_fixed_order(name, getkey):
    """Many table entries read one parameter element (a clipped distance, a T5
    bucket, padded positions, heads shared): `table_vjp` equals autodiff through
    the tables, and, for tables that select parameters, runs no scatter-add (the
    transpose of a gather: unordered atomics on GPUs)."""
    key = getkey()
    mod = {
        "clipped_relative": _clipped_relative,
        "t5": _t5,
        "scaled_index": lambda k: _ScaledIndex(
            jax.random.normal(k, (HQ, 4), jnp.float32), jnp.asarray(0.5, jnp.float32)
        ),
    }[name](key)
    converted = convert_score_mod(mod, jnp.float32)
    build = lambda m: kernel_mod(m, B, HQ, LQ, LKV, lq_pad=LQ_PAD, lkv_pad=LKV_PAD)
    tables = build(converted).tables
    keys = jax.random.split(getkey(), len(tables))
    grads = tuple(
        jax.random.normal(k, t.shape, jnp.float32)
        if jnp.issubdtype(t.dtype, jnp.floating)
        else None
        for k, t in zip(keys, tables)
    )
    got = table_vjp(build, converted, grads)
    _, vjp = eqx.filter_vjp(lambda m: build(m).tables, converted)
    cot = tuple(jnp.zeros_like(t) if g is None else g for g, t in zip(grads, tables))
    (want,) = vjp(cot)
    got_leaves = jax.tree_util.tree_leaves(got)
    want_leaves = jax.tree_util.tree_leaves(eqx.filter(want, eqx.is_inexact_array))
    assert len(got_leaves) == len(want_leaves) > 0
    for g, w in zip(got_leaves, want_leaves):
        assert g.shape == w.shape and g.dtype == w.dtype
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    program = str(jax.make_jaxpr(lambda g: table_vjp(build, converted, g))(grads))
    if name == "scaled_index":
        assert "scatter" in program  # the fallback
    else:
        assert "scatter" not in program and "sort" in program
