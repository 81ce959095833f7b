"""On the GPU: the `triton` backend's kernels at real tile sizes — against the `xla`
backend in float32 (every mod, GQA, ragged lengths, head dims 64 to 256, float16,
bfloat16 and float32 at both matmul precisions), against PyTorch FlexAttention on
identical inputs (when torch is importable), and bitwise determinism of score-mod
parameter gradients."""

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


pytestmark = [
    pytest.mark.gpu,
    # Lowering a Pallas kernel through Triton warns on every GPU compile.
    pytest.mark.filterwarnings(
        "ignore:The Pallas Triton backend is deprecated:DeprecationWarning"
    ),
]

L = 1024
H = 4
OPTIONS: dict = {}  # kernel options of every triton call (a CPU dry run interprets)
IDS = jnp.asarray((np.arange(L) * 5 // L).astype(np.int32))


def _mods(lq=L):
    slopes = jnp.linspace(0.05, 0.5, H).astype(jnp.float32)
    table = jax.random.normal(jax.random.key(5), (H, 2 * lq - 1), jnp.float32)
    relative = score_mods.RelativePositionBias(H, lq, table=table)
    ids = IDS[:lq]
    return {
        "causal": (masks.causal_mask, None),
        "alibi_causal": (masks.causal_mask, score_mods.Alibi(slopes)),
        "softcap_sliding": (masks.sliding_window(200), score_mods.SoftCap(20.0)),
        "document": (fa.and_masks(masks.causal_mask, masks.document_mask(ids)), None),
        "head_bias_no_mask": (
            None,
            score_mods.HeadBias(jnp.linspace(-1, 1, H, dtype=jnp.float32)),
        ),
        # A "diag" table, constant (a closure: gathered in the kernels) and
        # learnable (its gradient from the dQ kernel's diagonal sums).
        "relative_bias_causal": (masks.causal_mask, lambda *a: relative(*a)),
        "relative_bias_learnable": (None, relative),
    }


def _inputs(seed, b=2, hq=H, hkv=H, lq=L, lkv=L, d=128, dv=None, dtype=jnp.bfloat16):
    dv = d if dv is None else dv
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (b, hq, lq, d), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (b, hkv, lkv, d), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (b, hkv, lkv, dv), jnp.float32).astype(dtype)
    w = jax.random.normal(ks[3], (b, hq, lq, dv), jnp.float32)
    return q, k, v, w


def _loss(backend, bm, w, gqa=False, options=None):
    if backend == "triton":
        options = {"triton": {**OPTIONS, **(options or {})}}

    def loss(q, k, v, mod):
        out, lse = fa.flex_attention(
            q,
            k,
            v,
            mod,
            bm,
            enable_gqa=gqa,
            return_lse=True,
            backend=backend,
            kernel_options=options,
        )
        lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
        return jnp.sum(out.astype(jnp.float32) * w) + 0.1 * jnp.sum(lse**2)

    return loss


def _compare(backend, bm, mod, q, k, v, w, gqa=False, tol=1e-2, options=None):
    """Loss and gradients of `backend` against `xla` in float32 (highest)."""
    up = lambda x: x.astype(jnp.float32)
    learnable = isinstance(mod, eqx.Module) and bool(
        jax.tree_util.tree_leaves(eqx.filter(mod, eqx.is_inexact_array))
    )

    def grads(name, *qkv):
        loss = _loss(name, bm, w, gqa, options if name == backend else None)
        if learnable:
            return jax.jit(jax.value_and_grad(loss, (0, 1, 2, 3)))(*qkv, mod)
        f = lambda q, k, v: loss(q, k, v, mod)  # a closure: not a jit argument
        return jax.jit(jax.value_and_grad(f, (0, 1, 2)))(*qkv)

    got_val, got = grads(backend, q, k, v)
    with jax.default_matmul_precision("highest"):
        want_val, want = grads("xla", up(q), up(k), up(v))
    assert abs(float(got_val) - float(want_val)) <= tol * abs(float(want_val)) + tol
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        a, b = np.asarray(up(a)), np.asarray(b)
        assert not np.isnan(a).any()
        assert np.linalg.norm(a - b) <= tol * np.linalg.norm(b)


@pytest.mark.parametrize("name", list(_mods()))
def test_forward_and_gradients_match_xla(name):
    mask_mod, score_mod = _mods()[name]
    q, k, v, w = _inputs(0)
    bm = None if mask_mod is None else fa.create_block_mask(mask_mod, None, None, L, L)
    _compare("triton", bm, score_mod, q, k, v, w)


# (dtype, f32_precision, tolerance)
DTYPES = [
    (jnp.float16, None, 5e-3),
    (jnp.float32, "tf32", 1e-2),
    (jnp.float32, "tf32x3", 1e-4),
    (jnp.float32, "ieee", 1e-4),
]


@pytest.mark.parametrize("dtype,precision,tol", DTYPES, ids=lambda x: str(x))
def test_dtypes_and_float32_precision(dtype, precision, tol):
    mask_mod, score_mod = _mods()["alibi_causal"]
    q, k, v, w = _inputs(3, d=64, dtype=dtype)
    bm = fa.create_block_mask(mask_mod, None, None, L, L)
    options = {} if precision is None else {"f32_precision": precision}
    _compare("triton", bm, score_mod, q, k, v, w, tol=tol, options=options)


@pytest.mark.parametrize("d,dv", [(64, 64), (80, 80), (256, 256), (128, 64)])
def test_gqa_ragged_head_dims(d, dv):
    """GQA (4 query heads per key head), Lq != Lkv, both ragged, head dims padded
    inside, a per-batch document mask with a causal offset."""
    lq, lkv = 777, 1000
    q, k, v, w = _inputs(4, hq=8, hkv=2, lq=lq, lkv=lkv, d=d, dv=dv)
    ids = jnp.asarray(np.stack([np.arange(lkv) * 3 // lkv, np.arange(lkv) * 7 // lkv]))
    ids = ids.astype(jnp.int32)

    def mask(b, h, qi, kv):
        return (qi + lkv - lq >= kv) & (ids[b, jnp.minimum(qi, lkv - 1)] == ids[b, kv])

    bm = fa.create_block_mask(mask, 2, None, lq, lkv)
    slopes = jnp.linspace(0.05, 0.5, 8).astype(jnp.float32)
    _compare("triton", bm, score_mods.Alibi(slopes), q, k, v, w, gqa=True)


def test_fully_masked_rows():
    mod = lambda b, h, qi, kv: (qi % 3 != 1) & (kv <= qi)
    bm = fa.create_block_mask(mod, None, None, L, L)
    q, k, v, w = _inputs(5, d=64)
    out, lse = fa.flex_attention(
        q,
        k,
        v,
        block_mask=bm,
        return_lse=True,
        backend="triton",
        kernel_options={"triton": OPTIONS},
    )
    rows = np.arange(L) % 3 == 1
    out, lse = np.asarray(out.astype(jnp.float32)), np.asarray(lse)
    assert not np.isnan(out).any()
    np.testing.assert_array_equal(out[:, :, rows], 0.0)
    assert np.all(np.isneginf(lse[:, :, rows])) and np.all(
        np.isfinite(lse[:, :, ~rows])
    )


def test_parameter_gradients_are_bitwise_deterministic():
    """Five runs of a learnable ALiBi + per-query bias + relative-position table mod
    give identical bits (row and diagonal sums written per program and tile, reduced
    in a fixed order: no atomics)."""
    q, k, v, w = _inputs(1)
    bm = fa.create_block_mask(masks.causal_mask, None, None, L, L)
    grad = jax.jit(jax.grad(_loss("triton", bm, w), (0, 1, 2, 3)))
    assert_bitwise_repeatable(grad, q, k, v, LearnableBiases(H, L))


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_matches_torch_flex_attention(dtype):
    """Same inputs, same mods: outputs, lse and gradients (learnable ALiBi slopes
    included) against torch.nn.attention.flex_attention."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch sees no GPU")
    lq = 512
    jdtype = jnp.dtype(dtype)
    q, k, v, w = _inputs(2, b=1, lq=lq, lkv=lq, d=64, dtype=jdtype)
    slopes = jnp.linspace(0.05, 0.5, H).astype(jnp.float32)
    bm = fa.create_block_mask(masks.causal_mask, None, None, lq, lq)

    def ours(q, k, v, slopes):
        return fa.flex_attention(
            q,
            k,
            v,
            score_mods.Alibi(slopes),
            bm,
            return_lse=True,
            backend="triton",
            kernel_options={"triton": OPTIONS},
        )

    assert_matches_torch_alibi_causal(ours, q, k, v, slopes, w[:, :, :lq], dtype)


def test_auto_chooses_per_dtype():
    """sm90+: `mosaic` for bfloat16, `triton` for float32; below: `triton`."""
    cc = tuple(int(x) for x in jax.devices()[0].compute_capability.split("."))
    for dtype, want in (
        (jnp.bfloat16, "mosaic" if cc >= (9, 0) else "triton"),
        (jnp.float32, "triton"),
    ):
        x = jax.ShapeDtypeStruct((1, 2, 1024, 64), dtype)
        assert fa.explain_backend(x, x, x).splitlines()[0] == f"backend: {want}"
