"""The `triton` backend: its kernels in Pallas interpret mode against independent
oracles (numpy in float64, the `reference` backend's autodiff in float64), its
choice of tiles per GPU, its declines, and lowering for GPUs we do not have (A100,
RTX 4090, L4) on the CPU."""

import logging
import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import numpy_attention, on_gpu, random_qkv, to_f64

import eqx_flexattn as fa
from eqx_flexattn import masks, score_mods
from eqx_flexattn._backends import AUTO_ORDER, BACKENDS
from eqx_flexattn._backends.triton import (
    _configs,
    DEVICE_KINDS,
    f32_precision,
    TritonConfig,
)
from eqx_flexattn._backends.triton._kernels import Tiles


pytestmark = pytest.mark.skipif(
    on_gpu(), reason="interpret-mode and CPU lowering tests (tests/gpu runs the GPU)"
)

# Small tiles keep the interpreter fast and exercise multi-block lists.
SMALL = {"interpret": True, "block_q": 16, "block_kv": 16}
SMALL |= {"bwd_block_q": 16, "bwd_block_kv": 32}


def run(q, k, v, mod=None, bm=None, gqa=False, **options):
    return fa.flex_attention(
        q,
        k,
        v,
        mod,
        bm,
        enable_gqa=gqa,
        return_lse=True,
        backend="triton",
        kernel_options={"triton": SMALL | options},
    )


def test_auto_tries_triton_between_mosaic_and_xla():
    assert AUTO_ORDER == ("mosaic", "triton", "xla")
    assert BACKENDS["triton"].interpretable


# (name, B, Hq, Hkv, Lq, Lkv, D, Dv, block_size)
CASES = [
    ("ragged_gqa", 2, 4, 2, 37, 53, 12, 8, (16, 16)),
    ("decode", 1, 2, 1, 1, 70, 16, 16, (16, 16)),
    ("long_kv", 1, 2, 2, 20, 100, 32, 24, (8, 32)),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_forward_matches_numpy(case, getkey):
    """float32 in the interpreter: every mod kind, GQA, ragged lengths, padded head
    dims, a per-(batch, head) mask with fully masked rows."""
    _, b, hq, hkv, lq, lkv, d, dv, bs = case
    q, k, v = random_qkv(getkey(), b, hq, hkv, lq, lkv, d, dv, dtype=jnp.float32)
    ids = jnp.asarray(
        np.arange(b * lkv).reshape(b, lkv) * 7 // (3 * lkv) % 3, jnp.int32
    )
    ids_q = ids[:, :lq] if lq <= lkv else None
    slopes = jnp.linspace(0.1, 0.9, hq, dtype=jnp.float32)
    table = jax.random.normal(getkey(), (hq, lq + lkv - 1), jnp.float32)

    def mask(bb, h, qi, kv):
        keep = (jnp.abs(qi - kv) <= 9 + 7 * h) & ((qi + h) % 5 != 0)
        if ids_q is not None:
            keep &= ids_q[bb, qi] >= ids[bb, kv] - 1
        return keep

    def score(s, bb, h, qi, kv):
        s = s + slopes[h] * (kv - qi).astype(s.dtype) / 8 + table[h, kv - qi + lq - 1]
        return 4.0 * jnp.tanh(s / 4.0) + 0.1 * ids[bb, kv].astype(s.dtype)

    bm = fa.create_block_mask(mask, b, hq, lq, lkv, block_size=bs)
    out, lse = run(q, k, v, score, bm, gqa=hq != hkv)
    npids, npt, nps = (np.asarray(x) for x in (ids, table, slopes))

    def np_mask(bb, h, qi, kv):
        keep = (np.abs(qi - kv) <= 9 + 7 * h) & ((qi + h) % 5 != 0)
        if ids_q is not None:
            keep = keep & (npids[bb, np.minimum(qi, lkv - 1)] >= npids[bb, kv] - 1)
        return keep

    def np_score(s, bb, h, qi, kv):
        s = s + nps[h] * (kv - qi) / 8 + npt[h, kv - qi + lq - 1]
        return 4.0 * np.tanh(s / 4.0) + 0.1 * npids[bb, kv]

    want_out, want_lse = numpy_attention(q, k, v, score_fn=np_score, mask_fn=np_mask)
    assert out.shape == (b, hq, lq, dv) and out.dtype == jnp.float32
    assert not np.isnan(np.asarray(out)).any()
    np.testing.assert_allclose(out, want_out, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(lse, want_lse, atol=2e-5, rtol=2e-5)
    if lq > 1:  # some rows see nothing: output 0, lse -inf
        assert np.isneginf(np.asarray(lse)).any()


def test_fully_masked_rows_forward_and_gradient(getkey):
    mod = lambda b, h, q, kv: (q % 3 != 1) & (kv <= q)
    bm = fa.create_block_mask(mod, None, None, 40, 40, block_size=8)
    q, k, v = random_qkv(getkey(), 1, 2, 2, 40, 40, 16, dtype=jnp.float32)
    out, lse = run(q, k, v, None, bm)
    rows = np.arange(40) % 3 == 1
    np.testing.assert_array_equal(np.asarray(out)[:, :, rows], 0.0)
    assert np.all(np.isneginf(np.asarray(lse)[:, :, rows]))
    g = jax.grad(lambda q, k, v: jnp.sum(run(q, k, v, None, bm)[0] ** 2), (0, 1, 2))
    grads = jax.jit(g)(q, k, v)
    for x in grads:
        assert np.all(np.isfinite(np.asarray(x)))
    np.testing.assert_array_equal(np.asarray(grads[0])[:, :, rows], 0.0)


def loss(backend, bm, options=None):
    def f(q, k, v, mod):
        out, lse = fa.flex_attention(
            q,
            k,
            v,
            mod,
            bm,
            enable_gqa=q.shape[1] != k.shape[1],
            return_lse=True,
            backend=backend,
            kernel_options=options,
        )
        w = jnp.cos(jnp.arange(out.size, dtype=jnp.float32)).reshape(out.shape)
        out = out.astype(jnp.float32)
        finite = jnp.isfinite(lse)
        return jnp.sum(w * out) + 0.3 * jnp.sum(jnp.where(finite, lse, 0.0) ** 2)

    return f


class KeyBias(eqx.Module):
    bias: jax.Array  # (H, Lkv)

    def __call__(self, s, b, h, q, kv):
        return s + self.bias[h, kv]


# Small backward tiles, or the 64x64 ones the diagonal sums need.
BWD_64 = {k: v for k, v in SMALL.items() if not k.startswith("bwd_")}

# name: (mod, kernel options, whether the kernels compute the parameter gradient)
GRAD_MODS = {
    # A per-head table: its gradient from the dQ kernel's row sums.
    "alibi": (
        lambda key, h: score_mods.Alibi(jnp.linspace(0.1, 0.5, h, dtype=jnp.float32)),
        SMALL,
        True,
    ),
    "head_bias_softcap": (
        lambda key, h: score_mods.compose(
            score_mods.HeadBias(jnp.linspace(-1, 1, h, dtype=jnp.float32)),
            score_mods.SoftCap(2.0),
        ),
        SMALL,
        True,
    ),
    # Relative-position tables: the dQ kernel's diagonal sums on 64x64 tiles ...
    "relative_bias": (
        lambda key, h: score_mods.RelativePositionBias(h, 12, key=key),
        BWD_64,
        True,
    ),
    "t5": (lambda key, h: score_mods.T5RelativeBias(h, 8, 20, key=key), BWD_64, True),
    # A per-key table: the dK/dV kernel's per-key sums.
    "key_bias": (
        lambda key, h: KeyBias(jax.random.normal(key, (h, 45), jnp.float32)),
        SMALL,
        True,
    ),
    # Relative-position tables where the options set other backward tiles: the
    # xla backward.
    "relative_bias_other_tiles": (
        lambda key, h: score_mods.RelativePositionBias(h, 12, key=key),
        SMALL,
        False,
    ),
}


@pytest.mark.parametrize("mod_name", list(GRAD_MODS))
def test_gradients_match_reference(mod_name, getkey, caplog):
    """GQA, ragged lengths, a per-head mask with fully masked rows; dq, dk, dv and
    the score mod's parameters against float64 autodiff of the dense reference."""
    b, hq, hkv, lq, lkv = 2, 4, 2, 30, 45
    q, k, v = random_qkv(getkey(), b, hq, hkv, lq, lkv, 16, 8, dtype=jnp.float32)
    mask = lambda bb, h, qi, kv: (jnp.abs(qi - kv) <= 6 + 5 * h) & ((qi + h) % 5 != 0)
    bm = fa.create_block_mask(mask, None, hq, lq, lkv, block_size=(8, 16))
    make, options, in_kernel = GRAD_MODS[mod_name]
    mod = make(getkey(), hq)
    grad = lambda f: eqx.filter_jit(eqx.filter_grad(lambda a: f(*a)))
    with caplog.at_level(logging.DEBUG, logger="eqx_flexattn"):
        got = grad(loss("triton", bm, {"triton": options}))((q, k, v, mod))
    fell_back = "triton backward: the xla backward runs" in caplog.text
    assert fell_back != in_kernel
    want = grad(loss("reference", bm))(to_f64((q, k, v, mod)))
    got_leaves = jax.tree_util.tree_leaves(got)
    want_leaves = jax.tree_util.tree_leaves(want)
    assert len(got_leaves) == len(want_leaves) == 4
    for g, w in zip(got_leaves, want_leaves):
        w = np.asarray(w)
        assert g.dtype == jnp.float32 and np.all(np.isfinite(g))
        np.testing.assert_allclose(g, w, atol=2e-5 * np.abs(w).max(), rtol=1e-4)
    assert np.abs(np.asarray(got_leaves[3])).max() > 1e-3


def test_backward_tiles_smaller_than_the_padding(getkey):
    """Forward tiles larger than the backward's pad the lengths past the backward's
    own blocks (Lq = 40 -> 64 at 32-row forward tiles, 3 blocks of 16 rows for 4 dQ
    programs; Lkv = 70 -> 128, 3 blocks of 32 keys for 4 dK/dV programs): those
    programs get empty block lists. Read past the lists, they were an illegal
    address on an H100 (clamped, hence unseen, when interpreted: the launcher now
    refuses lists shorter than the grid)."""
    b, hq, hkv, lq, lkv = 2, 4, 2, 40, 70
    q, k, v = random_qkv(getkey(), b, hq, hkv, lq, lkv, 16, dtype=jnp.float32)
    mask = lambda bb, h, qi, kv: (kv <= qi + 30) & ((kv + bb) % 7 != 0)
    bm = fa.create_block_mask(mask, b, None, lq, lkv, block_size=16)
    mod = score_mods.Alibi(jnp.array([0.5, 0.25, 0.125, 0.0625], jnp.float32))
    tiles = {"block_q": 32, "block_kv": 64, "bwd_block_q": 16, "bwd_block_kv": 32}
    options = {"triton": {"interpret": True} | tiles}
    grad = lambda f: eqx.filter_jit(eqx.filter_value_and_grad(lambda a: f(*a)))
    val, got = grad(loss("triton", bm, options))((q, k, v, mod))
    want_val, want = grad(loss("reference", bm))(to_f64((q, k, v, mod)))
    np.testing.assert_allclose(val, want_val, rtol=1e-5)
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        w = np.asarray(w)
        np.testing.assert_allclose(g, w, atol=2e-5 * np.abs(w).max(), rtol=1e-4)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_forward_and_gradients(dtype, getkey):
    q, k, v = random_qkv(getkey(), 1, 2, 1, 48, 64, 32, dtype=dtype)
    bm = fa.create_block_mask(masks.causal_mask, None, None, 48, 64, block_size=16)
    mod = score_mods.Alibi(jnp.array([0.25, 0.5], jnp.float32))
    args = (q, k, v, mod)
    grad = lambda f: eqx.filter_jit(eqx.filter_value_and_grad(lambda a: f(*a)))
    (val, got) = grad(loss("triton", bm, {"triton": SMALL}))(args)
    (want_val, want) = grad(loss("reference", bm))(to_f64(args))
    tol = {jnp.bfloat16: 3e-2, jnp.float16: 5e-3}[dtype]
    np.testing.assert_allclose(val, want_val, rtol=tol)
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        w = np.asarray(w, np.float64)
        np.testing.assert_allclose(
            np.asarray(g, np.float64), w, atol=2 * tol * np.abs(w).max(), rtol=0
        )


def test_auto_takes_triton_where_mosaic_declines(getkey):
    """In the interpreter both kernel backends accept a CPU problem: `auto` then
    takes `mosaic` for bfloat16 (as on sm90+) and `triton` for float32."""
    options = {"mosaic": {"interpret": True}, "triton": {"interpret": True}}
    q = jax.ShapeDtypeStruct((1, 2, 128, 64), jnp.bfloat16)
    text = fa.explain_backend(q, q, q, kernel_options=options)
    assert text.splitlines()[0] == "backend: mosaic"
    q32 = jax.ShapeDtypeStruct((1, 2, 128, 64), jnp.float32)
    lines = fa.explain_backend(q32, q32, q32, kernel_options=options).splitlines()
    assert lines[:2] == [
        "backend: triton",
        "declined: mosaic: it takes bfloat16 or float16 inputs, got float32.",
    ]
    # Without a GPU (and not interpreting) both decline, saying why.
    lines = fa.explain_backend(q32, q32, q32).splitlines()
    assert lines[0] == "backend: xla"
    assert lines[2] == (
        "declined: triton: it needs an NVIDIA GPU (sm80 or newer); JAX runs on cpu."
    )


def test_declines_with_a_sentence():
    def reason(q, k=None, **options):
        k = q if k is None else k
        text = fa.explain_backend(
            q, k, k, backend="auto", kernel_options={"triton": options}
        )
        return [line for line in text.splitlines() if "triton" in line][0]

    s = lambda *shape, dtype=jnp.float32: jax.ShapeDtypeStruct(shape, dtype)
    assert reason(s(1, 1, 64, 64, dtype=jnp.float64), interpret=True).endswith(
        "triton: it takes float16, bfloat16 or float32 inputs, got float64."
    )
    assert reason(s(1, 1, 64, 512), interpret=True).endswith(
        "it takes head dims up to 256, got D=512, Dv=512."
    )
    assert "it needs an sm80 (Ampere) or newer GPU" in reason(
        s(1, 1, 64, 64), compute_capability="7.5"
    )
    # Tiles that cannot fit a card are a decline, with the numbers.
    text = reason(
        s(1, 1, 4096, 256),
        compute_capability="8.9",
        block_q=128,
        block_kv=128,
        num_stages=4,
    )
    assert "no configuration fits the GPU: forward tiles 128x128" in text
    assert "(the card has 99 KiB)" in text


def test_options_are_validated():
    with pytest.raises(ValueError, match="power of two of at least 16"):
        TritonConfig(block_q=48)
    with pytest.raises(ValueError, match="must be one of"):
        TritonConfig(f32_precision="fp32")
    with pytest.raises(ValueError, match="like '8.0'"):
        TritonConfig(compute_capability="sm80")
    q = jnp.zeros((1, 1, 16, 16), jnp.float32)
    with pytest.raises(ValueError, match="power of two"):
        fa.flex_attention(q, q, q, kernel_options={"triton": {"num_warps": 3}})


def test_float32_precision_follows_jax():
    cfg = TritonConfig()
    with jax.default_matmul_precision("highest"):
        assert f32_precision(cfg) == "ieee"
    with jax.default_matmul_precision("tensorfloat32"):
        assert f32_precision(cfg) == "tf32"
    with jax.default_matmul_precision("highest"):
        assert f32_precision(TritonConfig(f32_precision="tf32x3")) == "tf32x3"


CARDS = {"A100": (8, 0), "RTX 3090": (8, 6), "RTX 4090 / L4": (8, 9), "H100": (9, 0)}


@pytest.mark.parametrize("card", list(CARDS))
def test_default_tiles_fit_every_card(card):
    """Every head dim from 16 to 256 and every dtype gets tiles within the card's
    shared memory and registers; bigger cards get no smaller forward tiles."""
    cc = CARDS[card]
    for d in (16, 32, 64, 128, 256):
        for itemsize in (2, 4):
            for kind in ("forward", "backward"):
                t = _configs.choose(
                    kind, cc, d, d, itemsize, 8192, 8192, (128, 128), {}
                )
                # The backward tile serves both backward kernels.
                for k in ("forward",) if kind == "forward" else ("dq", "dkv"):
                    smem = _configs.shared_bytes(k, t, d, d, itemsize)
                    assert smem <= _configs.SHARED_MEMORY[cc], (k, d, itemsize, t)
                    assert _configs.registers_per_thread(k, t, d, d) <= 255
    # The estimate's consequence on the small cards: D=128 bf16 forward tiles.
    t = _configs.choose("forward", cc, 128, 128, 2, 8192, 8192, (128, 128), {})
    want = {(8, 0): Tiles(64, 64, 4, 3), (8, 6): Tiles(64, 64, 4, 2)}
    want[(8, 9)] = want[(8, 6)]
    want[(9, 0)] = want[(8, 0)]
    assert t == want[cc]


def test_tiles_follow_lengths_and_options():
    # One query row: the query tile shrinks to 16, the key tile stays the preferred.
    t = _configs.choose("forward", (8, 0), 64, 64, 2, 1, 70, (128, 128), {})
    assert (t.block_q, t.block_kv) == (16, _configs.HALF_PRECISION_FORWARD.block_kv)
    over = {"block_q": 32, "block_kv": 32, "num_warps": 2, "num_stages": 1}
    t = _configs.choose("forward", (8, 0), 64, 64, 2, 4096, 4096, (128, 128), over)
    assert t == Tiles(32, 32, 2, 1)
    with pytest.raises(NotImplementedError, match="do not divide one another"):
        _configs.choose("forward", None, 64, 64, 2, 4096, 4096, (48, 48), {})


@pytest.mark.parametrize(
    "kind",
    [
        "NVIDIA A100-SXM4-80GB",
        "NVIDIA A10",  # sm86, as the RTX 3090 (which jax's device table lacks)
        "NVIDIA GeForce RTX 4090",
        "NVIDIA L4",
    ],
)
def test_lowers_for_gpus_below_hopper(kind):
    """sm80, sm86, sm89: forward and backward (learnt ALiBi slopes and relative table:
    the dQ kernel's row and diagonal sums; document ids: per-row and per-key int
    tables) lower to three Triton kernels for the card, in bfloat16 and float32, on
    this CPU."""
    from jax.sharding import AbstractDevice, AbstractMesh

    cc = "{}.{}".format(*DEVICE_KINDS[kind])
    b, h, lq = 1, 2, 256
    ids = jnp.arange(lq, dtype=jnp.int32)[None] // 100
    mask = fa.and_masks(masks.causal_mask, masks.document_mask(ids))
    bm = fa.create_block_mask(mask, b, None, lq, lq)
    options = {"triton": {"compute_capability": cc}}
    mesh = AbstractMesh(
        (1,),
        ("x",),
        abstract_device=AbstractDevice(
            device_kind=kind, num_cores=None, platform="gpu"
        ),
    )
    # Learnt ALiBi slopes (the dQ kernel's row sums), with a relative-position table
    # (its diagonal sums, on 64x64 tiles: these fit every card at D=64)
    alibi = score_mods.Alibi(jnp.array([0.5, 0.25], jnp.float32))
    relative = score_mods.compose(  # and a per-key table: the dK/dV kernel's sums
        alibi,
        score_mods.RelativePositionBias(h, 64, key=jax.random.key(0)),
        KeyBias(jnp.zeros((h, lq), jnp.float32)),
    )
    for dtype, d, mod in (
        (jnp.bfloat16, 128, alibi),
        (jnp.bfloat16, 64, relative),
        (jnp.float32, 64, alibi),
    ):
        x = jax.ShapeDtypeStruct((b, h, lq, d), dtype)
        f = jax.jit(jax.grad(loss("triton", bm, options), argnums=(0, 1, 2, 3)))
        # Trace once off the mesh: the mods' kernel forms are cached with the
        # avals they were first traced with, and avals carry their abstract mesh.
        f.trace(x, x, x, mod)
        with warnings.catch_warnings():  # Pallas's Triton lowering is deprecated
            warnings.simplefilter("ignore", DeprecationWarning)
            with jax.sharding.use_abstract_mesh(mesh):
                low = f.trace(x, x, x, mod).lower(lowering_platforms=("cuda",))
        text = low.as_text()
        assert text.count("__gpu$xla.gpu.triton") == 3, (dtype, text[:2000])
