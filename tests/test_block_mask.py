import functools as ft
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import examples, numpy_attention, random_qkv
from hypothesis import given, settings, strategies as st

import eqx_flexattn as fa
from eqx_flexattn import masks


def numpy_block_states(dense: np.ndarray, bq: int, bkv: int):
    """(partial, full) per block from a dense (B, H, Lq, Lkv) bool mask (in-bounds)."""
    b, h, lq, lkv = dense.shape
    mq, nkv = math.ceil(lq / bq), math.ceil(lkv / bkv)
    partial = np.zeros((b, h, mq, nkv), bool)
    full = np.zeros((b, h, mq, nkv), bool)
    for i in range(mq):
        for j in range(nkv):
            tile = dense[:, :, i * bq : (i + 1) * bq, j * bkv : (j + 1) * bkv]
            anyk, allk = tile.any((2, 3)), tile.all((2, 3))
            full[:, :, i, j] = allk
            partial[:, :, i, j] = anyk & ~allk
    return partial, full


def window_head(b, h, q_idx, kv_idx):
    return jnp.abs(q_idx - kv_idx) <= 3 * (h + 1)


def batch_mask(b, h, q_idx, kv_idx):
    return (q_idx + kv_idx + b) % 5 != 0


CASES = [
    (masks.causal_mask, None, None, 64, 64, 16),
    (masks.causal_mask, None, None, 70, 45, (16, 8)),
    (window_head, None, 3, 50, 61, 8),
    (batch_mask, 2, None, 33, 33, (8, 16)),
    (masks.sliding_window(10), None, None, 40, 40, 8),
]


def check_block_states(mask_mod, B, H, lq, lkv, bs):
    """create_block_mask against the numpy classification of the dense mask."""
    bm = fa.create_block_mask(mask_mod, B, H, lq, lkv, block_size=bs)
    dense = np.asarray(fa.create_mask(mask_mod, B, H, lq, lkv))
    bq, bkv = (bs, bs) if isinstance(bs, int) else bs
    want_partial, want_full = numpy_block_states(dense, bq, bkv)
    partial, full = map(np.asarray, bm.block_states())
    np.testing.assert_array_equal(partial, want_partial)
    np.testing.assert_array_equal(full, want_full)
    return bm, want_partial | want_full


@pytest.mark.parametrize("mask_mod,B,H,lq,lkv,bs", CASES)
def test_block_states_match_dense_mask(mask_mod, B, H, lq, lkv, bs):
    bm, want_dense = check_block_states(mask_mod, B, H, lq, lkv, bs)
    np.testing.assert_array_equal(bm.to_dense(), want_dense)
    assert bm.shape == (B or 1, H or 1, lq, lkv)
    assert bm.block_size == ((bs, bs) if isinstance(bs, int) else bs)


@pytest.mark.parametrize("chunk", [1, 100, 300])
def test_chunked_evaluation_matches(monkeypatch, chunk):
    """Chunks over (batch x head, query blocks, key blocks) assemble correctly."""
    import eqx_flexattn._block_mask as block_mask_module

    monkeypatch.setattr(block_mask_module, "_MASK_CHUNK_ELEMENTS", chunk)
    for case in CASES[1:4]:
        check_block_states(*case)


@pytest.mark.parametrize("mask_mod,B,H,lq,lkv,bs", CASES[:3])
def test_lists_sorted_and_transposed(mask_mod, B, H, lq, lkv, bs):
    bm = fa.create_block_mask(mask_mod, B, H, lq, lkv, block_size=bs)
    partial, full = map(np.asarray, bm.block_states())
    (kv_p, kv_f), (q_p, q_f) = bm.block_lists(), bm.block_lists(transposed=True)
    assert kv_p[0] is bm.kv_num_blocks and kv_p[1] is bm.kv_indices
    assert q_f[0] is bm.full_q_num_blocks and q_f[1] is bm.full_q_indices
    for (num, idx), dense in (
        (kv_p, partial),
        (kv_f, full),
        (q_p, partial.swapaxes(-1, -2)),
        (q_f, full.swapaxes(-1, -2)),
    ):
        num, idx = np.asarray(num), np.asarray(idx)
        assert num.dtype == np.int32 and idx.dtype == np.int32
        np.testing.assert_array_equal(num, dense.sum(-1))
        for pos in np.ndindex(*num.shape):
            listed = idx[pos][: num[pos]]
            np.testing.assert_array_equal(listed, np.flatnonzero(dense[pos]))


def test_create_mask_values():
    dense = np.asarray(fa.create_mask(masks.causal_mask, None, None, 4, 5))
    np.testing.assert_array_equal(dense[0, 0], np.tril(np.ones((4, 5), bool)))


def test_jittable_and_data_leaves():
    ids = jnp.array([0, 0, 1, 1, 1, 2, 2, 2])
    build = jax.jit(
        lambda ids: fa.create_block_mask(
            masks.document_mask(ids), None, None, 8, 8, block_size=2
        )
    )
    bm1 = build(ids)
    bm2 = build(jnp.array([0, 0, 0, 0, 1, 1, 1, 1]))
    assert build._cache_size() == 1
    leaves = jax.tree_util.tree_leaves(bm1)
    assert all(isinstance(x, jax.Array) for x in leaves)
    assert len(leaves) == 8 + 2  # index arrays + the mask's q/kv document ids
    assert not np.array_equal(bm1.to_dense(), bm2.to_dense())


def test_passes_plain_jit_vmap_scan():
    ids = jnp.array([[0, 0, 1, 1], [0, 1, 1, 1]])
    bms = jax.vmap(
        lambda i: fa.create_block_mask(
            masks.document_mask(i), None, None, 4, 4, block_size=2
        )
    )(ids)
    assert bms.kv_num_blocks.shape == (2, 1, 1, 2)

    @jax.jit
    def count(bm):
        return bm.kv_num_blocks.sum() + bm.full_kv_num_blocks.sum()

    bm = fa.create_block_mask(masks.causal_mask, None, None, 16, 16, block_size=4)
    assert int(count(bm)) == 10

    def step(carry, bm):
        return carry + bm.to_dense().sum(), None

    total, _ = jax.lax.scan(step, 0, bms)
    assert int(total) == int(bms.to_dense().sum())
    assert eqx.filter_jit(lambda bm: bm)(bm).mask_mod is masks.causal_mask


def test_memory_is_chunked():
    """The mask is evaluated a few blocks at a time: no L x L temporary."""
    lowered = jax.jit(
        lambda: fa.create_block_mask(masks.causal_mask, None, None, 32768, 32768)
    ).lower()
    temp = lowered.compile().memory_analysis().temp_size_in_bytes
    assert temp < 256 * 2**20, temp  # an L x L bool alone would be 1 GiB
    # Many batch elements and heads: chunked over them too.
    lowered = jax.jit(
        lambda: fa.create_block_mask(masks.causal_mask, 16, 16, 16384, 16384)
    ).lower()
    temp = lowered.compile().memory_analysis().temp_size_in_bytes
    assert temp < 256 * 2**20, temp  # the B x H x L x L bools would be 64 GiB


def test_sparsity_getitem_repr():
    bm = fa.create_block_mask(window_head, 2, 3, 64, 64, block_size=16)
    dense = np.asarray(bm.to_dense())
    want_partial, want_full = numpy_block_states(
        np.asarray(fa.create_mask(window_head, 2, 3, 64, 64)), 16, 16
    )
    skipped = ~(want_partial | want_full)
    assert bm.sparsity() == pytest.approx(100 * skipped.sum() / skipped.size)
    assert float(jax.jit(lambda bm: bm.sparsity())(bm)) == pytest.approx(bm.sparsity())
    sub = bm[1]
    assert sub.shape == (1, 3, 64, 64)
    np.testing.assert_array_equal(sub.to_dense(), dense[1:2])
    sub = bm[-1, 1:]
    np.testing.assert_array_equal(sub.to_dense(), dense[1:2, 1:])
    with pytest.raises(IndexError, match="out of range"):
        bm[2]
    with pytest.raises(IndexError, match="batch and head"):
        bm[0, 0, 0]
    text = repr(
        fa.create_block_mask(masks.causal_mask, None, None, 32, 32, block_size=8)
    )
    assert "sparsity=37.50%" in text
    assert text.splitlines()[2:6] == ["░░", "██░░", "████░░", "██████░░"]


@pytest.mark.parametrize("x64", [True, False])
@pytest.mark.parametrize("computed", [1, 3, 4])
def test_sparsity_is_the_exact_percentage(computed, x64):
    # One query block row of 5 key blocks, `computed` of them attended: the skipped
    # share is (5 - computed) / 5, which a float mean rounds (19.999999999999996 in
    # float64, 40.000003814697266 in float32).
    mask = lambda b, h, q_idx, kv_idx: kv_idx < 16 * computed
    with jax.enable_x64(x64):
        bm = fa.create_block_mask(mask, None, None, 16, 80, block_size=16)
        value = bm.sparsity()
        traced = jax.jit(lambda bm: bm.sparsity())(bm)
    assert np.asarray(bm.to_dense()).sum() == computed  # the oracle's premise
    assert type(value) is float
    assert value == 100 * (5 - computed) / 5
    assert repr(value) == f"{20.0 * (5 - computed)}"  # "80.0", "40.0", "20.0"
    assert float(traced) == pytest.approx(value, rel=1e-6)


def test_repr_downsamples_large_masks():
    bm = fa.create_block_mask(masks.causal_mask, None, None, 8192, 8192, block_size=64)
    lines = repr(bm).splitlines()
    rows = lines[2:-1]
    assert len(rows) == 16 and max(map(len, rows)) == 32  # 16 x 16 cells
    assert "128 x 128 blocks" in lines[-1]
    assert "to_string(grid_size=None)" in lines[-1]
    assert str(bm) == repr(bm) == bm.to_string()
    every = bm.to_string(grid_size=None).splitlines()[2:]
    assert len(every) == 128 and max(map(len, every)) == 256
    assert bm.to_string(grid_size=-1) == bm.to_string(grid_size=None)
    assert len(bm.to_string(grid_size=(8, 4)).splitlines()[2:-1]) == 8
    # A mask that fits is drawn whole, without the note.
    small = fa.create_block_mask(masks.causal_mask, None, None, 2048, 2048)
    assert len(repr(small).splitlines()) == 2 + 16


def test_repr_under_jit_does_not_fail():
    @jax.jit
    def f(ids):
        bm = fa.create_block_mask(
            masks.document_mask(ids), None, None, 4, 4, block_size=2
        )
        assert repr(bm).startswith("BlockMask(shape=(1, 1, 4, 4)")
        return bm.kv_num_blocks

    f(jnp.array([0, 0, 1, 1]))


def test_adjust_matches_fresh_mask():
    mod = masks.sliding_window(7)
    big = fa.create_block_mask(mod, None, None, 100, 90, block_size=16)
    small = big.adjust(50, 41)
    fresh = fa.create_block_mask(mod, None, None, 50, 41, block_size=16)
    assert small.seq_lengths == (50, 41)
    # Cropping keeps every block of the fresh mask (it may keep a few more: blocks
    # cut by the new lengths are not re-evaluated), and attends identically.
    assert np.all(np.asarray(small.to_dense()) >= np.asarray(fresh.to_dense()))
    q, k, v = (
        jax.random.normal(jax.random.key(i), (1, 1, n, 8))
        for i, n in enumerate((50, 41, 41))
    )
    np.testing.assert_allclose(
        fa.flex_attention(q, k, v, block_mask=small, backend="xla"),
        fa.flex_attention(q, k, v, block_mask=fresh, backend="xla"),
        atol=1e-12,
    )
    with pytest.raises(ValueError, match=r"only shrink.*\(100, 90\).*\(120, 41\)"):
        big.adjust(120, 41)


def test_from_kv_blocks_roundtrip():
    bm = fa.create_block_mask(window_head, None, 2, 48, 48, block_size=16)
    rebuilt = fa.BlockMask.from_kv_blocks(
        bm.kv_num_blocks,
        bm.kv_indices,
        bm.full_kv_num_blocks,
        bm.full_kv_indices,
        block_size=16,
        mask_mod=window_head,
    )
    assert rebuilt.seq_lengths == (48, 48)
    for name in ("q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices"):
        np.testing.assert_array_equal(getattr(rebuilt, name), getattr(bm, name))


def test_from_kv_blocks_canonicalises():
    """Unsorted, repeated, and both-partial-and-full entries are cleaned up."""
    num = jnp.array([[[3, 1]]])
    idx = jnp.array([[[[2, 0, 2], [1, 0, 0]]]])
    full_num = jnp.array([[[1, 0]]])
    full_idx = jnp.array([[[[0, 1, 2], [0, 0, 0]]]])
    bm = fa.BlockMask.from_kv_blocks(num, idx, full_num, full_idx, block_size=4)
    np.testing.assert_array_equal(bm.kv_num_blocks, [[[1, 1]]])
    np.testing.assert_array_equal(bm.kv_indices[..., :1], [[[[2], [1]]]])
    np.testing.assert_array_equal(bm.full_kv_num_blocks, [[[1, 0]]])
    np.testing.assert_array_equal(bm.to_dense(), [[[[1, 0, 1], [0, 1, 0]]]])
    np.testing.assert_array_equal(bm.q_num_blocks, [[[0, 1, 1]]])


def test_from_kv_blocks_errors():
    num, idx = jnp.array([[[1]]]), jnp.array([[[[0, 1]]]])
    with pytest.raises(ValueError, match="both `full_kv_num_blocks` and"):
        fa.BlockMask.from_kv_blocks(num, idx, None, idx, block_size=4)
    with pytest.raises(Exception, match=r"outside \[0, 2\)"):
        fa.BlockMask.from_kv_blocks(num, jnp.array([[[[2, 0]]]]), block_size=4)
    with pytest.raises(Exception, match=r"outside \[0, 2\)"):
        fa.BlockMask.from_kv_blocks(num, jnp.array([[[[-1, 0]]]]), block_size=4)
    # Entries past the count are ignored, whatever they hold.
    bm = fa.BlockMask.from_kv_blocks(num, jnp.array([[[[1, 7]]]]), block_size=4)
    np.testing.assert_array_equal(bm.to_dense(), [[[[0, 1]]]])


def test_mask_mod_closing_over_traced_arrays():
    """Arrays a plain mask function captures become leaves: the mask leaves `jit`."""
    ids = jnp.array([0, 0, 1, 1, 1, 2, 2, 2])

    @jax.jit
    def build(ids):
        same = lambda b, h, q, kv: ids[q] == ids[kv]
        return fa.create_block_mask(
            fa.and_masks(masks.causal_mask, same), None, None, 8, 8, block_size=2
        )

    bm = build(ids)
    q = jax.random.normal(jax.random.key(0), (1, 1, 8, 4))
    np_ids = np.asarray(ids)
    want = numpy_attention(
        q, q, q, mask_fn=lambda b, h, qi, kv: (qi >= kv) & (np_ids[qi] == np_ids[kv])
    )[0]
    np.testing.assert_allclose(
        fa.flex_attention(q, q, q, block_mask=bm), want, atol=1e-6
    )
    assert build(ids + 1).kv_num_blocks.shape == (1, 1, 4)


class _SameDocument:  # a plain callable object, not a PyTree
    def __init__(self, ids):
        self.ids = ids

    def __call__(self, b, h, q, kv):
        return self.ids[q] == self.ids[kv]


def _same_document(ids, b, h, q, kv):
    return ids[q] == ids[kv]


def _with_default(ids):
    def mask(b, h, q, kv, i=ids):  # no closure: the array is a default argument
        return i[q] == i[kv]

    return mask


@pytest.mark.parametrize(
    "make",
    [
        lambda ids: ft.partial(_same_document, ids),
        _SameDocument,
        lambda ids: _SameDocument(ids).__call__,
        lambda ids: _with_default(ids),
        lambda ids: fa.and_masks(masks.causal_mask, ft.partial(_same_document, ids)),
    ],
    ids=["partial", "object", "bound_method", "default_argument", "nested"],
)
def test_mask_mod_holding_traced_arrays_otherwise(make):
    """Arrays held by a partial, a callable object or default arguments become
    leaves too: a mask built under `jit` is used outside without leaking tracers."""
    ids = jnp.array([0, 0, 1, 1, 1, 2, 2, 2])
    bm = jax.jit(
        lambda ids: fa.create_block_mask(make(ids), None, None, 8, 8, block_size=2)
    )(ids)
    q = jax.random.normal(jax.random.key(0), (1, 1, 8, 4))
    dense = np.asarray(fa.create_mask(make(ids), None, None, 8, 8))[0, 0]
    want = numpy_attention(q, q, q, mask_fn=lambda b, h, qi, kv: dense[qi, kv])[0]
    got = fa.flex_attention(q, q, q, block_mask=bm)
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_masks_from_one_closure_do_not_retrace():
    """The traced program of a hoisted mask mod compares equal when it is the same:
    fresh masks from the same closure (or the same code over other values) reuse the
    compiled function; a different program does not."""
    traces = []

    @jax.jit
    def attend(q, bm):
        traces.append(None)
        return fa.flex_attention(q, q, q, block_mask=bm)

    def same_document(ids):
        return lambda b, h, q, kv: ids[q] == ids[kv]

    ids = jnp.array([0, 0, 1, 1, 1, 2, 2, 2])
    q = jax.random.normal(jax.random.key(0), (1, 1, 8, 4))
    mod = same_document(ids)
    for mask_mod in (mod, mod, mod, same_document(ids[::-1])):
        attend(q, fa.create_block_mask(mask_mod, None, None, 8, 8, block_size=2))
    assert len(traces) == 1
    other = lambda b, h, qi, kv: ids[qi] != ids[kv]
    got = attend(q, fa.create_block_mask(other, None, None, 8, 8, block_size=2))
    assert len(traces) == 2
    np_ids = np.asarray(ids)
    want = numpy_attention(
        q, q, q, mask_fn=lambda b, h, qi, kv: np_ids[qi] != np_ids[kv]
    )[0]
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_combinators():
    even = lambda b, h, q, kv: kv % 2 == 0
    d_and = fa.create_mask(fa.and_masks(masks.causal_mask, even), None, None, 6, 6)
    d_or = fa.create_mask(fa.or_masks(masks.causal_mask, even), None, None, 6, 6)
    q, kv = np.ogrid[:6, :6]
    np.testing.assert_array_equal(d_and[0, 0], (q >= kv) & (kv % 2 == 0))
    np.testing.assert_array_equal(d_or[0, 0], (q >= kv) | (kv % 2 == 0))
    assert bool(fa.create_mask(fa.noop_mask, None, None, 3, 3).all())


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(B=0), ValueError, "`B` must be a positive int"),
        (dict(Q_LEN=-3), ValueError, "`Q_LEN` must be a positive int"),
        (dict(block_size=(16, 0)), ValueError, "`block_size` must be positive"),
        (dict(block_size=1.5), TypeError, "block_size"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    args = dict(mask_mod=masks.causal_mask, B=None, H=None, Q_LEN=8, KV_LEN=8)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        fa.create_block_mask(**args)


def test_bad_mask_mods():
    with pytest.raises(TypeError, match="mask_mod `.*<lambda>` must return a bool"):
        fa.create_block_mask(lambda b, h, q, kv: q - kv, None, None, 8, 8)
    table = jnp.ones((8, 8), bool)
    with pytest.raises(ValueError, match=r"returned shape \(8,\)"):
        fa.create_block_mask(lambda b, h, q, kv: table[q], None, None, 8, 8)
    with pytest.raises(TypeError, match="could not be called as `mask_mod"):
        fa.create_block_mask(lambda q, kv: q >= kv, None, None, 8, 8)
    with pytest.raises(TypeError, match="mask_mod"):
        fa.create_block_mask("causal", None, None, 8, 8)


def test_block_mask_shape_validation():
    bm = fa.create_block_mask(masks.causal_mask, None, None, 32, 32, block_size=8)
    with pytest.raises(ValueError, match=r"`kv_indices` has shape \(1, 1, 4, 3\)"):
        fa.BlockMask(
            bm.kv_num_blocks,
            bm.kv_indices[..., :3],
            bm.full_kv_num_blocks,
            bm.full_kv_indices,
            bm.q_num_blocks,
            bm.q_indices,
            bm.full_q_num_blocks,
            bm.full_q_indices,
            block_size=8,
            seq_lengths=(32, 32),
        )


# --- at_block_size ---------------------------------------------------------------


class HeadWindows(eqx.Module):
    """A symmetric window of its own width per head."""

    widths: jax.Array

    def __call__(self, b, h, q_idx, kv_idx):
        return jnp.abs(q_idx - kv_idx) <= self.widths[h]


@st.composite
def mask_cases(draw):
    """(mask_mod, B, H, Lq, Lkv): lengths need not be multiples of any block size."""
    kind = draw(st.sampled_from(["causal", "window", "documents", "head_windows"]))
    lq, lkv = draw(st.integers(1, 60)), draw(st.integers(1, 60))
    b, h = None, None
    if kind == "causal":
        mod = masks.causal_mask
    elif kind == "window":
        mod = masks.sliding_window(draw(st.integers(1, 20)))
    elif kind == "documents":
        b = draw(st.integers(1, 2))
        # Sorted ids: packed documents (each row of the sorted flat list is sorted).
        ids = [
            np.sort(draw(st.lists(st.integers(0, 3), min_size=b * n, max_size=b * n)))
            for n in (lq, lkv)
        ]
        ids = [i.reshape(b, -1) for i in ids]
        mod = masks.document_mask(*(jnp.asarray(i, jnp.int32) for i in ids))
    else:
        h = draw(st.integers(1, 3))
        widths = draw(st.lists(st.integers(0, 25), min_size=h, max_size=h))
        mod = HeadWindows(jnp.asarray(widths, jnp.int32))
    return mod, b, h, lq, lkv


fine_sizes = st.tuples(st.sampled_from([1, 2, 4, 8]), st.sampled_from([1, 2, 4, 8]))
factors = st.tuples(st.sampled_from([1, 2, 4]), st.sampled_from([1, 2, 4]))


def assert_same_block_mask(got, want):
    """Same sizes and mask mod (static, in the tree structure), same arrays."""
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_array_equal(g, w)


def element_mask(bm, dense):
    """The (B, H, Lq, Lkv) pairs `bm` attends: full blocks, and the mask mod's
    elements (`dense`, from `create_mask`) in partial blocks."""
    bq, bkv = bm.block_size
    lq, lkv = bm.seq_lengths

    def expand(x):
        x = np.repeat(np.repeat(np.asarray(x), bq, axis=-2), bkv, axis=-1)
        return x[..., :lq, :lkv]

    partial, full = bm.block_states()
    return expand(full) | (expand(partial) & dense)


# Jitted (sizes static): compiling once per case is much faster than op by op.
at_block_size = eqx.filter_jit(lambda bm, size: bm.at_block_size(*size))


@settings(max_examples=examples(full=25, default=5))
@given(case=mask_cases(), fine=fine_sizes, factor=factors)
def test_at_block_size_against_create_block_mask(case, fine, factor):
    """Coarsening is create_block_mask at the coarse size; refining is valid."""
    mod, b, h, lq, lkv = case
    coarse = (fine[0] * factor[0], fine[1] * factor[1])
    fine_bm = fa.create_block_mask(mod, b, h, lq, lkv, block_size=fine)
    coarse_bm = fa.create_block_mask(mod, b, h, lq, lkv, block_size=coarse)

    coarsened = at_block_size(fine_bm, coarse)
    assert_same_block_mask(coarsened, coarse_bm)
    assert eqx.tree_equal(coarsened.mask_mod, mod)

    refined = at_block_size(coarse_bm, fine)
    assert refined.block_size == fine and refined.seq_lengths == (lq, lkv)
    assert refined.num_blocks == fine_bm.num_blocks
    # Same attention, element by element.
    dense = np.asarray(fa.create_mask(mod, b, h, lq, lkv))
    np.testing.assert_array_equal(element_mask(refined, dense), dense)
    # Never tighter than create_block_mask: a block listed as full is full there, a
    # skipped block is skipped there, a block partial there is partial here.
    partial, full = map(np.asarray, refined.block_states())
    want_partial, want_full = map(np.asarray, fine_bm.block_states())
    assert np.all(want_full[full])
    assert not np.any((want_partial | want_full)[~(partial | full)])
    assert np.all(partial[want_partial])
    # Each block has its parent's state (so where the parent is full or absent it
    # equals create_block_mask, by the checks above); coarsening back is exact.
    mq, nkv = fine_bm.num_blocks
    for x, parent in zip((partial, full), coarse_bm.block_states()):
        parent = np.repeat(np.repeat(np.asarray(parent), factor[0], -2), factor[1], -1)
        np.testing.assert_array_equal(x, parent[..., :mq, :nkv])
    assert_same_block_mask(at_block_size(refined, coarse), coarse_bm)


@settings(max_examples=examples(full=15, default=3))
@given(
    case=mask_cases(),
    old=fine_sizes,
    change=st.tuples(
        st.sampled_from([(1, 1), (2, 1), (4, 1), (1, 2), (1, 4)]),
        st.sampled_from([(1, 1), (2, 1), (4, 1), (1, 2), (1, 4)]),
    ),
    seed=st.integers(0, 2**16),
)
def test_at_block_size_same_attention(case, old, change, seed):
    """Coarsening, refining, or one of each: flex_attention is unchanged."""
    mod, b, h, lq, lkv = case
    old = (old[0] * 4, old[1] * 4)
    new = tuple(o * m // d for o, (m, d) in zip(old, change))
    bm = fa.create_block_mask(mod, b, h, lq, lkv, block_size=old)
    converted = at_block_size(bm, new)
    assert converted.block_size == new
    q, k, v = random_qkv(jax.random.key(seed), b or 1, h or 1, h or 1, lq, lkv, 8)
    run = lambda m: fa.flex_attention(
        q, k, v, block_mask=m, backend="xla", return_lse=True
    )
    for got, want in zip(run(converted), run(bm)):
        assert got.dtype == jnp.float64
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_at_block_size_jit_no_mask_evaluation_and_errors():
    bm = fa.create_block_mask(window_head, 2, 3, 50, 61, block_size=8)
    assert bm.at_block_size(8, 8) is bm
    # Jittable; its arrays and mask mod cross `jit` as data.
    got = jax.jit(lambda bm: bm.at_block_size(16, 4))(bm)
    assert_same_block_mask(got, bm.at_block_size(16, 4))
    assert got.shape == (2, 3, 50, 61) and got.block_size == (16, 4)

    # The mask mod is never called, whatever the size.
    def boom(b, h, q_idx, kv_idx):
        raise AssertionError("the mask mod was evaluated")

    (num, idx), (full_num, full_idx) = bm.block_lists()
    big = fa.BlockMask.from_kv_blocks(
        num, idx, full_num, full_idx, block_size=8, mask_mod=boom
    )
    for size in [(32, 64), (4, 2), (2, 64)]:
        assert big.at_block_size(*size).mask_mod is boom

    with pytest.raises(ValueError, match=r"\(8, 8\) to block_size=\(12, 8\).*8 and 12"):
        bm.at_block_size(12, 8)
    with pytest.raises(ValueError, match=r"8 and 6 are not"):
        bm.at_block_size(16, 6)
    with pytest.raises(ValueError, match="must be positive"):
        bm.at_block_size(0, 8)
