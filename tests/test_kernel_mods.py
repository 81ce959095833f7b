"""Mods split for kernels (`_mods.kernel_mod`): tables plus scalar arithmetic must
compute exactly what the mod computes, and mods a kernel cannot take are declined."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eqx_flexattn as fa
from eqx_flexattn import masks, score_mods
from eqx_flexattn._backends.mosaic import _tile_eval
from eqx_flexattn._backends.mosaic._mod_tiles import _scalar_pullback
from eqx_flexattn._mods import (
    convert_mask_mod,
    convert_score_mod,
    diag_index,
    index_grid,
    kernel_mod,
)


B, H, LQ, LKV = 2, 4, 40, 56
PAD_Q, PAD_KV = 64, 64
IDS = jnp.array([[0] * 10 + [1] * 46, [0] * 25 + [1] * 31], jnp.int32)
BIAS = jnp.array([0.5, -1.0, 2.0, 3.0], jnp.float32)

MASKS = {
    "causal": masks.causal_mask,
    "document_per_batch": fa.and_masks(
        masks.causal_mask, masks.document_mask(IDS[:, :LQ], IDS)
    ),
    "document_shared": masks.document_mask(IDS[0, :LQ], IDS[0]),
    "sliding_window": masks.sliding_window(5),
    "prefix_lm": masks.prefix_lm(7),
    "chunked": masks.chunked(8),
    "dilated": masks.dilated_sliding_window(3, 2),
    "neighborhood": masks.neighborhood_2d(8, 1),
    "noop": fa.noop_mask,
    "head_dependent": lambda b, h, q, kv: (jnp.abs(q - kv) <= 2 + h) & (b <= 1),
}
SCORES = {
    "alibi": score_mods.Alibi(jnp.linspace(0.1, 0.9, H, dtype=jnp.float32)),
    "softcap": score_mods.SoftCap(3.0),
    "checkerboard": score_mods.checkerboard,
    "head_bias": score_mods.HeadBias(BIAS),
    "global_bias": score_mods.HeadBias(jnp.array(0.7, jnp.float32)),
    "composed": score_mods.compose(
        score_mods.Alibi(jnp.linspace(0.1, 0.9, H, dtype=jnp.float32)),
        score_mods.SoftCap(5.0),
    ),
    "closure_per_query": lambda s, b, h, q, kv: (
        s + BIAS[h] * jnp.sin(q.astype(jnp.float32))
    ),
    "bf16_table": lambda s, b, h, q, kv: s + BIAS.astype(jnp.bfloat16)[h],
    # Reductions of arrays are hoisted too: they depend on no index.
    "reduced_table": lambda s, b, h, q, kv: s + jnp.sum(BIAS) * (q - kv),
    # Lookups by kv_idx - q_idx (either sign) are "diag" tables.
    "relative_bias": score_mods.RelativePositionBias(H, 20, key=jax.random.key(1)),
    "t5": score_mods.T5RelativeBias(H, 16, 40, key=jax.random.key(2)),
    "negated_difference_per_batch": lambda s, b, h, q, kv: (
        s * jnp.arange(1.0, 200.0, dtype=jnp.float32)[q - kv + 99 - b]
    ),
}


def _values(km, lq, lkv):
    """The tables, each broadcast over the (B, H, Lq, Lkv) grid as a kernel loads it."""
    out = []
    for table, spec in zip(km.tables, km.specs):
        if spec.kind == "scalar":
            out.append(table[:, :, None, None])
        elif spec.kind == "q":
            out.append(table[:, :, :lq, None])
        elif spec.kind == "kv":
            out.append(table[:, :, None, :lkv])
        else:
            q, kv = np.arange(lq)[:, None], np.arange(lkv)[None, :]
            out.append(table[:, :, diag_index(q, kv, PAD_Q)])
    return out


def _check(converted, is_score):
    km = kernel_mod(converted, B, H, LQ, LKV, lq_pad=PAD_Q, lkv_pad=PAD_KV)
    for table, spec in zip(km.tables, km.specs):
        lead = (B if spec.batch else 1, H if spec.head else 1)
        tail = {
            "scalar": (),
            "q": (PAD_Q,),
            "kv": (PAD_KV,),
            "diag": (PAD_Q + PAD_KV - 1,),
        }[spec.kind]
        assert table.shape == lead + tail
    grid = index_grid(B, H, LQ, LKV)
    score = jax.random.normal(jax.random.key(0), (B, H, LQ, LKV), jnp.float32)
    args = ([score] if is_score else []) + list(grid)
    got = km.apply(*args, *_values(km, LQ, LKV))
    want = converted(*args)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    return km


@pytest.mark.parametrize("name", list(MASKS))
def test_mask_mods_split_exactly(name):
    _check(convert_mask_mod(MASKS[name]), is_score=False)


@pytest.mark.parametrize("name", list(SCORES))
def test_score_mods_split_exactly(name):
    _check(convert_score_mod(SCORES[name], jnp.float32), is_score=True)


def test_table_kinds():
    km = _check(convert_mask_mod(MASKS["document_per_batch"]), is_score=False)
    assert [(s.kind, s.batch, s.head) for s in km.specs] == [
        ("q", True, False),
        ("kv", True, False),
    ]
    assert km.uses == {"q", "kv"}
    km = _check(convert_score_mod(SCORES["alibi"], jnp.float32), is_score=True)
    assert [(s.kind, s.batch, s.head) for s in km.specs] == [("scalar", False, True)]
    # Padded positions read the last position's entry.
    km = _check(convert_mask_mod(MASKS["document_shared"]), is_score=False)
    np.testing.assert_array_equal(km.tables[0][0, 0, LQ:], IDS[0, LQ - 1])
    km = _check(convert_score_mod(SCORES["relative_bias"], jnp.float32), True)
    assert [(s.kind, s.batch, s.head) for s in km.specs] == [("diag", False, True)]
    assert km.uses == set()
    km = _check(
        convert_score_mod(SCORES["negated_difference_per_batch"], jnp.float32), True
    )
    assert [(s.kind, s.batch, s.head) for s in km.specs] == [("diag", True, False)]
    # Diagonals past the lengths read the last one: kv - q = LKV - 1 and 1 - LQ.
    last = km.tables[0][:, 0, diag_index(0, LKV - 1, PAD_Q)]
    first = km.tables[0][:, 0, diag_index(LQ - 1, 0, PAD_Q)]
    np.testing.assert_array_equal(
        km.tables[0][:, 0, diag_index(0, PAD_KV - 1, PAD_Q)], last
    )
    np.testing.assert_array_equal(km.tables[0][:, 0, 0], first)


@pytest.mark.parametrize(
    "mod,match",
    [
        (
            lambda s, b, h, q, kv: s + jnp.ones((8, 8), jnp.float32)[q % 8, kv % 8],
            "depends on both q_idx and kv_idx other than through their difference",
        ),
        (
            lambda s, b, h, q, kv: s + jnp.ones(300, jnp.float32)[kv - q + 50] * q,
            None,  # a diag table, and q_idx in the arithmetic: fine
        ),
        (
            lambda s, b, h, q, kv: s + jnp.ones(300, jnp.float32)[kv - q + q % 2],
            "other than through their difference",
        ),
        (
            lambda s, b, h, q, kv: s + BIAS[(s > 0).astype(jnp.int32)],
            "computed from the score",
        ),
    ],
)
def test_declines_with_a_reason(mod, match):
    if match is None:
        _check(convert_score_mod(mod, jnp.float32), is_score=True)
        return
    with pytest.raises(NotImplementedError, match=match):
        kernel_mod(
            convert_score_mod(mod, jnp.float32),
            B,
            H,
            LQ,
            LKV,
            lq_pad=PAD_Q,
            lkv_pad=PAD_KV,
        )


def test_declines_64_bit_arithmetic():
    table = jnp.arange(H, dtype=jnp.float64)
    with pytest.raises(NotImplementedError, match="64-bit|float64"):
        kernel_mod(
            convert_score_mod(lambda s, b, h, q, kv: s + table[h], jnp.float32),
            B,
            H,
            LQ,
            LKV,
            lq_pad=PAD_Q,
            lkv_pad=PAD_KV,
        )


def _tile_inputs(km, b, h, q0, kv0, shape, rows):
    """What a kernel hands `_tile_eval` for the tile at `q0`, `kv0` (`rows`: "q"
    or "kv" along the tile's rows): positions and tables as vectors."""
    axis = {"q": 0 if rows == "q" else 1, "kv": 1 if rows == "q" else 0}
    n = {"q": shape[axis["q"]], "kv": shape[axis["kv"]]}
    pos = {
        w: jnp.arange(n[w], dtype=jnp.int32) + p for w, p in (("q", q0), ("kv", kv0))
    }
    args = [_tile_eval.scalar(jnp.int32(b)), _tile_eval.scalar(jnp.int32(h))]
    args += [_tile_eval.vector(pos[w], axis[w], PAD_Q + PAD_KV) for w in ("q", "kv")]
    for table, spec in zip(km.tables, km.specs):
        t = table[b if spec.batch else 0, h if spec.head else 0]
        if spec.kind == "scalar":
            args.append(_tile_eval.scalar(t))
        elif spec.kind in ("q", "kv"):
            args.append(_tile_eval.vector(t[pos[spec.kind]], axis[spec.kind]))
        else:
            q, kv = jnp.meshgrid(pos["q"], pos["kv"], indexing="ij")
            d = t[diag_index(q, kv, PAD_Q)]
            args.append(_tile_eval.tile(d if rows == "q" else d.T))
    return args, pos


@pytest.mark.parametrize("rows", ["q", "kv"])
@pytest.mark.parametrize("name", list(MASKS) + list(SCORES))
def test_tile_evaluation_is_exact(name, rows):
    """A mod evaluated on row and column vectors (`_tile_eval`, as the Mosaic GPU
    kernels do) gives exactly the mod's values on the tile, and its VJP exactly the
    mod's VJP."""
    is_score = name in SCORES
    mod = MASKS.get(name) or SCORES[name]
    conv = convert_score_mod(mod, jnp.float32) if is_score else convert_mask_mod(mod)
    km = kernel_mod(conv, B, H, LQ, LKV, lq_pad=PAD_Q, lkv_pad=PAD_KV)
    b, h, q0, kv0, shape = 1, 2, 8, 16, (16, 24)
    args, pos = _tile_inputs(km, b, h, q0, kv0, shape, rows)
    grid_q, grid_kv = jnp.meshgrid(pos["q"], pos["kv"], indexing="ij")
    orient = (lambda x: x) if rows == "q" else (lambda x: x.T)
    grid = (jnp.int32(b), jnp.int32(h), grid_q, grid_kv)
    apply = km.split.apply
    if not is_score:
        (got,) = _tile_eval.evaluate(apply.jaxpr, apply.consts, args, shape)
        want = orient(jnp.broadcast_to(conv(*grid), grid_q.shape))
        np.testing.assert_array_equal(_tile_eval.broadcast(got, shape), want)
        return
    s = jax.random.normal(jax.random.key(3), grid_q.shape, jnp.float32)
    ds = jax.random.normal(jax.random.key(4), grid_q.shape, jnp.float32)
    s_args = [_tile_eval.tile(orient(s))] + args
    (got,) = _tile_eval.evaluate(apply.jaxpr, apply.consts, s_args, shape)
    np.testing.assert_array_equal(
        _tile_eval.broadcast(got, shape), orient(conv(s, *grid))
    )
    pullback = _scalar_pullback(km, ())
    ds_raw, *rest = _tile_eval.evaluate(
        pullback.jaxpr, pullback.consts, [_tile_eval.tile(orient(ds))] + s_args, shape
    )
    want = jax.vjp(lambda s_: conv(s_, *grid), s)[1](ds)[0]
    assert rest == []
    np.testing.assert_allclose(
        _tile_eval.broadcast(ds_raw, shape), orient(want), rtol=1e-6, atol=1e-6
    )


def test_position_differences_convert_on_vectors():
    """ALiBi's `float(kv_idx - q_idx)` is converted on the row and column vectors:
    no tile-sized integer-to-float conversion (it issues at the rate of exp2), and
    exactly the values of the tile-sized one, also for positions near 2**22."""
    conv = convert_score_mod(SCORES["alibi"], jnp.float32)
    big = 2**22 - 64
    km = kernel_mod(conv, B, H, LQ, LKV, lq_pad=PAD_Q, lkv_pad=PAD_KV)
    apply = km.split.apply
    shape = (64, 128)

    def tile_alibi(s, q0, kv0):
        q = _tile_eval.vector(jnp.arange(64, dtype=jnp.int32) + q0, 0, big + 64)
        kv = _tile_eval.vector(jnp.arange(128, dtype=jnp.int32) + kv0, 1, big + 128)
        slope = _tile_eval.scalar(km.tables[0][0, 1])
        b, h = _tile_eval.scalar(jnp.int32(0)), _tile_eval.scalar(jnp.int32(1))
        args = [_tile_eval.tile(s), b, h, q, kv, slope]
        (out,) = _tile_eval.evaluate(apply.jaxpr, apply.consts, args, shape)
        return _tile_eval.broadcast(out, shape)

    s = jnp.zeros(shape, jnp.float32)
    jaxpr = jax.make_jaxpr(tile_alibi)(s, jnp.int32(0), jnp.int32(0))
    converts = [
        e for e in jaxpr.jaxpr.eqns if e.primitive.name == "convert_element_type"
    ]
    assert converts and all(len(e.outvars[0].aval.shape) == 1 for e in converts)
    q, kv = jnp.meshgrid(
        big + jnp.arange(64), big - 40 + jnp.arange(128), indexing="ij"
    )
    want = conv(s, 0, 1, q, kv)
    np.testing.assert_array_equal(tile_alibi(s, big, big - 40), want)
