"""Ready-made mask and score mods against their definitions, written in numpy."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import numpy_attention, random_qkv, to_f64

import eqx_flexattn as fa
from eqx_flexattn import masks, score_mods


L = 40
IDS = np.repeat(np.arange(5), 8)
B_IDS = np.stack([IDS, np.repeat(np.arange(2), 20)])

MASKS = {
    "causal": (masks.causal_mask, lambda b, q, kv: q >= kv),
    "sliding_window": (
        masks.sliding_window(5),
        lambda b, q, kv: (q >= kv) & (q - kv <= 5),
    ),
    "prefix_lm": (masks.prefix_lm(9), lambda b, q, kv: (kv < 9) | (q >= kv)),
    "document": (
        masks.document_mask(jnp.asarray(IDS)),
        lambda b, q, kv: IDS[q] == IDS[kv],
    ),
    "document_batched": (
        masks.document_mask(jnp.asarray(B_IDS)),
        lambda b, q, kv: B_IDS[b, q] == B_IDS[b, kv],
    ),
    "chunked": (masks.chunked(6), lambda b, q, kv: q // 6 == kv // 6),
    "dilated": (
        masks.dilated_sliding_window(3, 4),
        lambda b, q, kv: (q >= kv) & (q - kv <= 12) & ((q - kv) % 4 == 0),
    ),
    "neighborhood_2d": (
        masks.neighborhood_2d(8, 1),
        lambda b, q, kv: (
            (np.abs(q // 8 - kv // 8) <= 1) & (np.abs(q % 8 - kv % 8) <= 1)
        ),
    ),
}


@pytest.mark.parametrize("name", list(MASKS))
def test_masks(name):
    mod, np_fn = MASKS[name]
    dense = np.asarray(fa.create_mask(mod, 2, 1, L, L))
    b, q, kv = np.ogrid[:2, :L, :L]
    np.testing.assert_array_equal(
        dense[:, 0], np.broadcast_to(np_fn(b, q, kv), (2, L, L))
    )


def test_masks_reject_bad_parameters():
    with pytest.raises(ValueError, match="`window` must be a positive int"):
        masks.sliding_window(0)
    with pytest.raises(ValueError, match="`dilation` must be a positive int"):
        masks.dilated_sliding_window(4, -1)
    with pytest.raises(TypeError, match="document_ids"):
        masks.document_mask(jnp.zeros((2, 2, 2), jnp.int32))


def t5_bucket_reference(rel, num_buckets, max_distance, bidirectional):
    """T5's relative_position_bucket, transcribed with Python scalars."""
    ret = 0
    n = -rel
    if bidirectional:
        num_buckets //= 2
        ret += num_buckets if n < 0 else 0
        n = abs(n)
    else:
        n = max(n, 0)
    max_exact = num_buckets // 2
    if n < max_exact:
        return ret + n
    val = max_exact + int(
        math.log(n / max_exact)
        / math.log(max_distance / max_exact)
        * (num_buckets - max_exact)
    )
    return ret + min(val, num_buckets - 1)


def test_alibi_slopes():
    np.testing.assert_allclose(
        score_mods.generate_alibi_bias(8).slopes, 2.0 ** (-np.arange(1, 9)), rtol=1e-6
    )
    np.testing.assert_allclose(
        score_mods.generate_alibi_bias(4).slopes, [0.25, 0.0625, 0.015625, 0.00390625]
    )


def _score_cases(key):
    k1, k2, k3 = jax.random.split(key, 3)
    rpb = to_f64(score_mods.RelativePositionBias(3, 10, key=k1))
    t5 = to_f64(score_mods.T5RelativeBias(3, 16, 30, key=k2))
    t5_uni = to_f64(score_mods.T5RelativeBias(3, 8, 30, bidirectional=False, key=k3))
    table = np.asarray(rpb.table)
    slopes = np.array([0.5, 0.25, 0.125])
    bucket = np.vectorize(t5_bucket_reference)
    return {
        "alibi": (
            score_mods.Alibi(jnp.asarray(slopes)),
            lambda s, h, q, kv: s + slopes[h] * (kv - q),
        ),
        "softcap": (score_mods.SoftCap(3.0), lambda s, h, q, kv: 3 * np.tanh(s / 3)),
        "relative_bias": (
            rpb,
            lambda s, h, q, kv: s + table[h, np.clip(kv - q, -9, 9) + 9],
        ),
        "t5": (
            t5,
            lambda s, h, q, kv: (
                s + np.asarray(t5.table)[h, bucket(kv - q, 16, 30, True)]
            ),
        ),
        "t5_unidirectional": (
            t5_uni,
            lambda s, h, q, kv: (
                s + np.asarray(t5_uni.table)[h, bucket(kv - q, 8, 30, False)]
            ),
        ),
        "head_bias": (
            score_mods.HeadBias(jnp.asarray(slopes)),
            lambda s, h, q, kv: s + slopes[h],
        ),
        "checkerboard": (
            score_mods.checkerboard,
            lambda s, h, q, kv: np.where(np.abs(q - kv) % 2 == 0, s, s / 2),
        ),
        "composed": (
            score_mods.compose(
                score_mods.Alibi(jnp.asarray(slopes)), score_mods.SoftCap(3.0)
            ),
            lambda s, h, q, kv: 3 * np.tanh((s + slopes[h] * (kv - q)) / 3),
        ),
    }


@pytest.mark.parametrize(
    "name",
    [
        "alibi",
        "softcap",
        "relative_bias",
        "t5",
        "t5_unidirectional",
        "head_bias",
        "checkerboard",
        "composed",
    ],
)
def test_score_mods_in_attention(name, getkey):
    mod, np_fn = _score_cases(getkey())[name]
    q, k, v = random_qkv(getkey(), 1, 3, 3, 50, 50, 8)
    want = numpy_attention(
        q, k, v, score_fn=lambda s, b, h, qi, kv: np_fn(s, h, qi, kv)
    )[0]
    got = fa.flex_attention(q, k, v, mod, backend="reference")
    np.testing.assert_allclose(got, want, atol=1e-12)


def test_t5_bucket_values():
    rel = np.arange(-200, 201)
    got = score_mods.t5_bucket(jnp.asarray(rel, jnp.int32), 32, 128, True)
    want = [t5_bucket_reference(r, 32, 128, True) for r in rel]
    np.testing.assert_array_equal(got, want)


def test_score_mod_constructors_validate():
    with pytest.raises(ValueError, match="`cap` must be positive"):
        score_mods.SoftCap(0.0)
    with pytest.raises(ValueError, match=r"`table` must have shape \(2, 7\)"):
        score_mods.RelativePositionBias(2, 4, table=jnp.zeros((2, 5)))
    with pytest.raises(TypeError, match="score_mods|compose takes score mods"):
        score_mods.compose(score_mods.checkerboard, 3)


@pytest.mark.parametrize(
    "mod,match",
    [
        # Slopes per key/value head instead of per query head: an easy GQA slip.
        (score_mods.Alibi(jnp.ones(2)), r"Alibi: `slopes` .* size 2 .* Hq=4"),
        (score_mods.RelativePositionBias(2, 4), r"RelativePositionBias: `table`.*Hq=4"),
        (score_mods.T5RelativeBias(3, 8, 16), r"T5RelativeBias: `table`.*Hq=4"),
        (score_mods.HeadBias(jnp.ones(1)), r"HeadBias: `bias` .* Hq=4"),
        (
            score_mods.compose(score_mods.SoftCap(2.0), score_mods.Alibi(jnp.ones(3))),
            r"Alibi: `slopes` .* size 3 .* at least 4",
        ),
    ],
)
def test_score_mod_arrays_checked_against_shape(mod, match, getkey):
    q, k, v = random_qkv(getkey(), 1, 4, 2, 8, 8, 4)
    for backend in ("xla", "reference"):
        with pytest.raises(ValueError, match=match):
            fa.flex_attention(q, k, v, mod, enable_gqa=True, backend=backend)
    with pytest.raises(ValueError, match=match):  # under jit too: shapes are static
        jax.jit(lambda q: fa.flex_attention(q, k, v, mod, enable_gqa=True))(q)
    # Large enough (a global bias, more heads than used) is fine.
    fa.flex_attention(q, k, v, score_mods.HeadBias(jnp.ones(())), enable_gqa=True)
    fa.flex_attention(q, k, v, score_mods.Alibi(jnp.ones(6)), enable_gqa=True)


def test_document_ids_checked_against_shape(getkey):
    short = masks.document_mask(jnp.zeros(6, jnp.int32))
    for build in (fa.create_block_mask, fa.create_mask):
        with pytest.raises(ValueError, match=r"DocumentMask: `q_document_ids`.*Lq=8"):
            build(short, None, None, 8, 8)
    kv_short = masks.document_mask(jnp.zeros(8, jnp.int32), jnp.zeros(7, jnp.int32))
    with pytest.raises(ValueError, match=r"`kv_document_ids`.*Lkv=8"):
        fa.create_block_mask(fa.and_masks(masks.causal_mask, kv_short), 1, 1, 8, 8)
    # Batched ids must match the mask's batch size, also when it broadcasts (B=None).
    batched = masks.document_mask(jnp.zeros((2, 8), jnp.int32))
    with pytest.raises(ValueError, match=r"`q_document_ids`.*axis 0.*B=1, so it must"):
        fa.create_block_mask(batched, None, None, 8, 8, block_size=4)
    with pytest.raises(ValueError, match=r"B=3"):
        fa.create_mask(fa.or_masks(batched, masks.causal_mask), 3, 1, 8, 8)
    fa.create_block_mask(batched, 2, None, 8, 8, block_size=4)  # fine
    # flex_attention checks the block mask's mod against the query's B.
    q = jax.random.normal(getkey(), (3, 1, 8, 4))
    bm = fa.BlockMask.from_kv_blocks(
        jnp.full((1, 1, 2), 2),
        jnp.array([[[[0, 1], [0, 1]]]]),
        block_size=4,
        mask_mod=batched,
    )
    with pytest.raises(ValueError, match=r"`q_document_ids`.*B=3"):
        fa.flex_attention(q, q, q, block_mask=bm)
    # Longer ids are fine (a cropped mask keeps its mod).
    bm = fa.create_block_mask(masks.document_mask(jnp.zeros(8, int)), 1, 1, 8, 8)
    fa.flex_attention(q[:, :, :5], q[:, :, :5], q[:, :, :5], block_mask=bm.adjust(5, 5))
