"""Sharded attention on 8 forced CPU devices (tests/conftest.py): batch and head
sharding, and context parallelism (ring, all-gather, balanced layout) against the
dense float64 reference on one device."""

import importlib.util
import pathlib
import re

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import eqx_flexattn as fa
from eqx_flexattn import context_parallel as cp
from eqx_flexattn._context_parallel import ring_schedule


B, H, D = 2, 4, 8
BLOCK = 8


@pytest.fixture(scope="module", autouse=True)
def _eight_devices():
    assert jax.device_count() >= 8, (
        "these tests need 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8"
        " (tests/conftest.py sets it before jax starts)"
    )


def _mesh(shape, names):
    devices = np.array(jax.devices()[: int(np.prod(shape))]).reshape(shape)
    return Mesh(devices, names)


def _inputs(length, hkv=H, dtype=jnp.float64, seed=0):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(kq, (B, H, length, D), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (B, hkv, length, D), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (B, hkv, length, D), jnp.float32).astype(dtype)
    return q, k, v


def _loss(attention):
    """A scalar of the output and the lse (finite rows), with its parts as aux."""

    def loss(q, k, v, score_mod):
        out, lse = attention(q, k, v, score_mod)
        finite = jnp.isfinite(lse)
        value = jnp.sum(out * jnp.cos(out)) + jnp.sum(
            jnp.where(finite, jnp.sin(lse), 0.0)
        )
        return value, (out, lse)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))


def _compare(sharded, q, k, v, score_mod, block_mask, rtol, atol, gqa=False):
    """Out, lse and the gradients of q, k, v and every score-mod parameter."""
    reference = _loss(
        lambda q, k, v, s: fa.flex_attention(
            q,
            k,
            v,
            s,
            block_mask,
            enable_gqa=gqa,
            return_lse=True,
            backend="reference",
        )
    )
    wide = lambda x: x.astype(jnp.float64) if eqx.is_inexact_array(x) else x
    (_, (out, lse)), grads = _loss(sharded)(q, k, v, score_mod)
    (_, (out_r, lse_r)), grads_r = reference(*jax.tree.map(wide, (q, k, v, score_mod)))
    np.testing.assert_array_equal(np.isfinite(lse), np.isfinite(lse_r))
    finite = np.isfinite(lse_r)
    np.testing.assert_allclose(
        np.where(finite, lse, 0), np.where(finite, lse_r, 0), rtol, atol
    )
    np.testing.assert_allclose(out, out_r, rtol, atol)
    leaves, leaves_r = jax.tree.leaves(grads), jax.tree.leaves(grads_r)
    assert len(leaves) == len(leaves_r) >= 3
    for g, g_r in zip(leaves, leaves_r):
        assert g.dtype == q.dtype or g.shape != q.shape
        np.testing.assert_allclose(g, g_r, rtol, atol * 10)


def _documents(length):
    ids = np.zeros((B, length), np.int32)
    ids[0] = np.arange(length) // 23
    ids[1] = np.searchsorted([10, 47, 50], np.arange(length), side="right")
    return jnp.asarray(ids)


def _alibi(dtype=jnp.float64):
    return fa.score_mods.Alibi(fa.score_mods.alibi_slopes(H).astype(dtype))


def _table(dtype=jnp.float64):
    return fa.score_mods.RelativePositionBias(H, 12, key=jax.random.key(7), dtype=dtype)


def _call(mesh, block_mask, *, gqa=False, balanced_devices=None, **kw):
    def attention(q, k, v, score_mod):
        length = q.shape[2]
        if balanced_devices:
            q, k, v = (
                cp.to_balanced(x, balanced_devices, block_size=BLOCK) for x in (q, k, v)
            )
        out, lse = cp.flex_attention(
            q,
            k,
            v,
            score_mod,
            block_mask,
            mesh=mesh,
            enable_gqa=gqa,
            return_lse=True,
            layout="balanced" if balanced_devices else "natural",
            **kw,
        )
        if balanced_devices:
            out = cp.from_balanced(out, balanced_devices, length)
            lse = cp.from_balanced(lse, balanced_devices, length)
        return out, lse

    return attention


# (name, mesh shape and axes, sharded axes, mask, score mod, extra)
CASES = {
    "ring-4-balanced-causal-alibi": dict(
        mesh=((4,), ("seq",)),
        kw=dict(axis_name="seq", strategy="ring"),
        mask="causal",
        mod=_alibi,
        balanced=4,
        length=90,
    ),
    "ring-2x4-batch-documents-table": dict(
        mesh=((2, 4), ("data", "seq")),
        kw=dict(axis_name="seq", batch_axis="data", strategy="ring"),
        mask="documents",
        mod=_table,
        length=75,
    ),
    "ring-8-sliding-table-gqa": dict(
        mesh=((8,), ("seq",)),
        kw=dict(axis_name="seq", strategy="ring"),
        mask="sliding",
        mod=_table,
        hkv=2,
        length=100,
    ),
    "gather-2x4-heads-balanced-documents-alibi": dict(
        mesh=((2, 4), ("model", "seq")),
        kw=dict(axis_name="seq", head_axis="model", strategy="all_gather"),
        mask="documents",
        mod=_alibi,
        balanced=4,
        length=70,
    ),
    "gather-2-causal-none": dict(
        mesh=((2,), ("seq",)),
        kw=dict(axis_name="seq"),  # auto: all-gather
        mask="causal",
        mod=lambda: None,
        length=33,
    ),
}


def _mask(name, length, block_size=BLOCK):
    mods = {
        "causal": (fa.masks.causal_mask, None),
        "sliding": (fa.masks.sliding_window(9), None),
    }
    if name in mods:
        mod, b = mods[name]
    else:  # "documents": causal, within each batch row's documents
        docs = fa.masks.document_mask(_documents(length))
        mod, b = fa.and_masks(fa.masks.causal_mask, docs), B
    return fa.create_block_mask(mod, b, None, length, length, block_size=block_size)


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_single_device_float64(case):
    c = CASES[case]
    length = c["length"]
    q, k, v = _inputs(length, c.get("hkv", H))
    bm = _mask(c["mask"], length)
    gqa = c.get("hkv", H) != H
    sharded = _call(
        _mesh(*c["mesh"]), bm, gqa=gqa, balanced_devices=c.get("balanced"), **c["kw"]
    )
    _compare(sharded, q, k, v, c["mod"](), bm, 1e-9, 1e-10, gqa)


def test_ring_float32():
    length = 60
    q, k, v = _inputs(length, dtype=jnp.float32, seed=3)
    bm = _mask("causal", length)
    sharded = _call(_mesh((4,), ("seq",)), bm, axis_name="seq", strategy="ring")
    _compare(sharded, q, k, v, _alibi(jnp.float32), bm, 2e-4, 2e-5)


def test_batch_head_sharding_moves_no_kv():
    """Batch x heads over a 2x4 mesh: the same results, output sharded like the
    input, and no collective at all in the forward pass (only the psum of the
    score mod's parameter gradients in the backward pass)."""
    length = 40
    mesh = _mesh((2, 4), ("data", "model"))
    q, k, v = _inputs(length)
    bm = _mask("documents", length)
    attention = _call(mesh, bm, batch_axis="data", head_axis="model")
    _compare(attention, q, k, v, _alibi(), bm, 1e-9, 1e-10)
    spec = NamedSharding(mesh, PartitionSpec("data", "model"))
    q, k, v = (jax.device_put(x, spec) for x in (q, k, v))
    fwd = (
        jax.jit(lambda q, k, v, s: attention(q, k, v, s)[0])
        .lower(q, k, v, _alibi())
        .compile()
    )
    assert fwd.output_shardings.spec == spec.spec
    assert _collectives(fwd.as_text()) == {}
    grad = _loss(attention).lower(q, k, v, _alibi()).compile()
    ops = _collectives(grad.as_text())
    assert set(ops) <= {"all-reduce"}, ops  # the psum of d(slopes)


def _collectives(hlo: str, floats_only: bool = False) -> dict[str, int]:
    """Collectives in compiled HLO, by name; `floats_only`: those of floating data
    (not the int32 block-mask metadata XLA may combine across devices)."""
    names = "all-gather|all-reduce|collective-permute|all-to-all|reduce-scatter"
    found: dict[str, int] = {}
    for dtype, name in re.findall(rf"= \(?(\w+)\[[^=]*?\b({names})(?:-start)?\(", hlo):
        if not floats_only or dtype.startswith(("f", "bf")):
            found[name] = found.get(name, 0) + 1
    return found


def test_ring_moves_kv_by_ppermute_only():
    length = 64
    mesh = _mesh((4,), ("seq",))
    bm = _mask("causal", length)
    q, k, v = _inputs(length)
    attention = _call(mesh, bm, axis_name="seq", strategy="ring")
    spec = NamedSharding(mesh, PartitionSpec(None, None, "seq"))
    q, k, v = (jax.device_put(x, spec) for x in (q, k, v))
    hlo = jax.jit(lambda *a: attention(*a, None)).lower(q, k, v).compile().as_text()
    assert "collective-permute" in _collectives(hlo)
    assert set(_collectives(hlo, floats_only=True)) == {"collective-permute"}


def test_ring_skips_chunks_outside_the_band():
    length = 8 * 16
    window = fa.create_block_mask(
        fa.masks.sliding_window(9), None, None, length, length, block_size=BLOCK
    )
    # Each device's 16 queries see keys at most 9 back: its chunk and the one before.
    expected = np.zeros((8, 8), bool)
    expected[:, 0] = True
    expected[1:, 1] = True
    np.testing.assert_array_equal(ring_schedule(window, 8), expected)
    causal = fa.create_block_mask(
        fa.masks.causal_mask, None, None, length, length, block_size=BLOCK
    )
    # Natural layout: device i computes i + 1 steps; balanced: every device all 8.
    np.testing.assert_array_equal(ring_schedule(causal, 8).sum(1), np.arange(1, 9))
    assert ring_schedule(causal, 8, "balanced").all()


def test_balanced_layout_round_trip():
    x = jnp.arange(2 * 37).reshape(2, 37)
    y = cp.to_balanced(x, 3, axis=1, block_size=4)
    assert y.shape == (2, 48)  # 6 chunks of 8
    np.testing.assert_array_equal(y[0, 8:16], jnp.pad(x[0], (0, 11))[40:48])  # chunk 5
    np.testing.assert_array_equal(cp.from_balanced(y, 3, 37, axis=1), x)


def test_strategy_rule():
    assert cp.choose_strategy(2, 8, 8) == "all_gather"
    assert cp.choose_strategy(8, 8, 8) == "ring"
    assert (
        cp.choose_strategy(8, 32, 4) == "all_gather"
    )  # GQA: 8 query heads per kv head
    assert cp.choose_strategy(8, 32, 8) == "ring"


def test_errors():
    q, k, v = _inputs(32)
    mesh = _mesh((4,), ("seq",))
    bm = _mask("causal", 32)
    call = lambda **kw: cp.flex_attention(q, k, v, None, bm, mesh=mesh, **kw)
    with pytest.raises(ValueError, match="'sequence' is not an axis of the mesh"):
        call(axis_name="sequence")
    with pytest.raises(ValueError, match="strategy"):
        call(axis_name="seq", strategy="tree")
    with pytest.raises(ValueError, match="different mesh axes"):
        call(axis_name="seq", batch_axis="seq")
    with pytest.raises(ValueError, match="batch size B=2 must be a multiple"):
        call(batch_axis="seq")
    with pytest.raises(ValueError, match="to_balanced"):
        call(axis_name="seq", layout="balanced")
    with pytest.raises(ValueError, match="needs a `block_mask`"):
        cp.flex_attention(q, k, v, mesh=mesh, axis_name="seq", layout="balanced")
    with pytest.raises(ValueError, match="same length"):
        cp.flex_attention(q, k[:, :, :16], v[:, :, :16], mesh=mesh, axis_name="seq")
    with pytest.raises(TypeError, match="mesh"):
        cp.flex_attention(q, k, v, mesh="seq", axis_name="seq")


# merge_attention


def test_merge_is_attention_over_the_union(getkey):
    q, k, v = _inputs(24)
    bm = _mask("causal", 24)
    out, lse = fa.flex_attention(
        q, k, v, block_mask=bm, return_lse=True, backend="reference"
    )
    parts = [(0, 5), (5, 16), (16, 24)]
    outs, lses = [], []
    for lo, hi in parts:
        sub = fa.create_block_mask(
            lambda b, h, i, j, lo=lo: i >= j + lo,
            None,
            None,
            24,
            hi - lo,
            block_size=BLOCK,
        )
        o, part_lse = fa.flex_attention(
            q,
            k[:, :, lo:hi],
            v[:, :, lo:hi],
            block_mask=sub,
            return_lse=True,
            backend="reference",
        )
        outs.append(o)
        lses.append(part_lse)
    # Row 0..4 see nothing of the last part: lse -inf there.
    assert np.isneginf(lses[2][..., :16]).all()
    merged, merged_lse = fa.merge_attention(outs, lses)
    np.testing.assert_allclose(merged, out, 1e-12, 1e-12)
    np.testing.assert_allclose(merged_lse, lse, 1e-12, 1e-12)


def test_merge_gradients_and_fully_masked_rows(getkey):
    outs = jax.random.normal(getkey(), (3, 2, 5, 4), jnp.float64)
    lses = jax.random.normal(getkey(), (3, 2, 5), jnp.float64)
    lses = (
        lses.at[1, 0].set(-jnp.inf).at[:, 1, 2].set(-jnp.inf)
    )  # a masked part, a masked row
    out, lse = fa.merge_attention(outs, lses)
    assert np.isneginf(lse[1, 2]) and (out[1, 2] == 0).all()

    o_np, l_np = np.asarray(outs), np.asarray(lses)
    with np.errstate(divide="ignore"):
        lse_np = np.log(np.sum(np.exp(l_np), axis=0))
    w = np.exp(l_np - np.where(np.isfinite(lse_np), lse_np, 0))
    np.testing.assert_allclose(lse, lse_np, 1e-12)
    np.testing.assert_allclose(out, np.sum(w[..., None] * o_np, 0), 1e-12, 1e-12)

    def f(o, part_lses):
        out, lse = fa.merge_attention(o, part_lses)
        return jnp.sum(jnp.sin(out)) + jnp.sum(
            jnp.where(jnp.isfinite(lse), lse, 0) ** 2
        )

    g_out, g_lse = jax.grad(f, argnums=(0, 1))(outs, lses)
    assert np.isfinite(g_out).all() and np.isfinite(g_lse).all()
    assert (g_lse[1, 0] == 0).all() and (g_lse[:, 1, 2] == 0).all()
    # Finite differences along a random direction, on the finite entries.
    d_out = jax.random.normal(getkey(), outs.shape, jnp.float64)
    d_lse = jnp.where(
        jnp.isfinite(lses), jax.random.normal(getkey(), lses.shape, jnp.float64), 0
    )
    eps = 1e-6
    safe = jnp.where(jnp.isfinite(lses), lses, -jnp.inf)
    numeric = (
        f(outs + eps * d_out, safe + eps * d_lse)
        - f(outs - eps * d_out, safe - eps * d_lse)
    ) / (2 * eps)
    analytic = jnp.sum(g_out * d_out) + jnp.sum(
        jnp.where(jnp.isfinite(lses), g_lse * d_lse, 0)
    )
    np.testing.assert_allclose(numeric, analytic, 1e-6)


def test_merge_errors():
    with pytest.raises(ValueError, match="one more"):
        fa.merge_attention([jnp.zeros((3, 4))] * 2, [jnp.zeros(3)] * 3)
    with pytest.raises(TypeError, match="non-empty sequence"):
        fa.merge_attention([], [])


@pytest.mark.skipif(
    jax.__version_info__ < (0, 11),
    reason="the Mosaic GPU interpreter needs jax >= 0.11",
)
def test_mosaic_kernels_under_shard_map_interpreted():
    """The Mosaic kernels (interpreted) as the ring's local backend: a ring of one
    device in the balanced layout (two chunks, so the local mods translate two
    segments of positions), ragged length, causal + ALiBi, bfloat16, against the
    float32 reference. (Mosaic GPU's interpreter simulates one device: on a mesh of
    several CPU devices running at once it mixes up their barriers.)"""
    length, block = 200, 64
    mesh = _mesh((1,), ("seq",))
    ks = jax.random.split(jax.random.key(5), 3)
    q, k, v = (
        jax.random.normal(x, (1, 2, length, 64), jnp.float32).astype(jnp.bfloat16)
        for x in ks
    )
    bm = fa.create_block_mask(
        fa.masks.causal_mask, None, None, length, length, block_size=block
    )
    alibi = fa.score_mods.generate_alibi_bias(2)

    def sharded(q, k, v, mod):
        q, k, v = (cp.to_balanced(x, 1, block_size=block) for x in (q, k, v))
        out, lse = cp.flex_attention(
            q, k, v, mod, bm, mesh=mesh, axis_name="seq", strategy="ring",
            layout="balanced", backend="mosaic", return_lse=True,
            kernel_options={"mosaic": {"interpret": True}},
        )  # fmt: skip
        return cp.from_balanced(out, 1, length), cp.from_balanced(lse, 1, length)

    f32 = lambda x: x.astype(jnp.float32)
    reference = lambda q, k, v, mod: fa.flex_attention(
        q, k, v, mod, bm, return_lse=True, backend="reference"
    )
    (_, (out, lse)), grads = _loss(sharded)(q, k, v, alibi)
    (_, (out_r, lse_r)), grads_r = _loss(reference)(f32(q), f32(k), f32(v), alibi)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(f32(out), out_r, 2e-2, 2e-2)
    np.testing.assert_allclose(lse, lse_r, 1e-4, 1e-4)
    for g, g_r in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_r)):
        assert np.linalg.norm(f32(g) - g_r) <= 1e-2 * np.linalg.norm(g_r)


def test_multihead_layer_under_batch_sharding_moves_nothing():
    """`MultiheadFlexAttention` (vmapped over a batch sharded on a 2x4 mesh, `xla`
    backend) compiles to a program without collectives, keeps the output sharded,
    and gives the unsharded result."""
    mesh = _mesh((8,), ("data",))
    layer = fa.nn.MultiheadFlexAttention(
        num_heads=4, query_size=16, key=jax.random.key(0), dtype=jnp.float64
    )
    x = jax.random.normal(jax.random.key(1), (8, 24, 16), jnp.float64)
    causal = fa.masks.causal_mask
    call = jax.jit(
        lambda layer, x: jax.vmap(lambda x: layer(x, x, x, mask_mod=causal))(x)
    )
    want = call(layer, x)
    x = jax.device_put(x, NamedSharding(mesh, PartitionSpec("data")))
    compiled = call.lower(layer, x).compile()
    assert _collectives(compiled.as_text()) == {}
    assert compiled.output_shardings.spec == PartitionSpec("data")
    np.testing.assert_allclose(compiled(layer, x), want, 1e-12, 1e-12)


def test_long_context_example_runs():
    path = pathlib.Path(__file__).parent.parent / "examples" / "long_context.py"
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    errors = module.main()
    assert set(errors) == {"out", "d_slopes", "merge"}
    assert all(e < 1e-5 for e in errors.values()), errors


@pytest.mark.parametrize("axes", [dict(axis_name="seq"), dict(head_axis="seq")])
def test_explicit_mesh(axes):
    """`jax.make_mesh`'s default (`Explicit` axes): inputs are resharded to the
    specs `shard_map` takes; a ragged length is cropped after."""
    mesh = jax.make_mesh((2, 4), ("data", "seq"))
    length = 44
    q, k, v = _inputs(length)
    bm = _mask("documents", length)
    got = jax.jit(
        lambda q, k, v: cp.flex_attention(
            q, k, v, _alibi(), bm, mesh=mesh, batch_axis="data", return_lse=True,
            **axes,
        )
    )(q, k, v)  # fmt: skip
    want = fa.flex_attention(
        q, k, v, _alibi(), bm, return_lse=True, backend="reference"
    )
    np.testing.assert_allclose(got[0], want[0], 1e-10, 1e-10)
    np.testing.assert_allclose(got[1], want[1], 1e-10, 1e-10)


@pytest.mark.skipif(
    jax.__version_info__ < (0, 11), reason="the Mosaic GPU lowering needs jax >= 0.11"
)
def test_ring_lowers_the_mosaic_kernels_for_the_gpu(monkeypatch):
    """On an abstract mesh of one device, the ring's local problems (translated
    positions, balanced layout, ALiBi with its gradient) go through the Mosaic GPU
    lowering at real tiles: no host callback, no decline."""
    from eqx_flexattn._backends import BACKENDS

    monkeypatch.setattr(type(BACKENDS["mosaic"]), "check", lambda self, problem: None)
    mesh = jax.sharding.AbstractMesh((1,), ("seq",))
    length = 1024
    spec = jax.ShapeDtypeStruct((1, 2, length, 128), jnp.bfloat16)
    bm = fa.create_block_mask(fa.masks.causal_mask, None, None, length, length)

    def loss(q, k, v, mod):
        q, k, v = (cp.to_balanced(x, 1) for x in (q, k, v))
        out, lse = cp.flex_attention(
            q, k, v, mod, bm, mesh=mesh, axis_name="seq", strategy="ring",
            layout="balanced", backend="mosaic", return_lse=True,
        )  # fmt: skip
        return jnp.sum(out.astype(jnp.float32)) + jnp.sum(
            jnp.where(jnp.isfinite(lse), lse, 0.0)
        )

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
    alibi = fa.score_mods.generate_alibi_bias(2)
    lowered = grads.trace(spec, spec, spec, alibi).lower(lowering_platforms=("cuda",))
    assert lowered.as_text().count("mosaic_gpu") >= 3  # forward, dQ, dK/dV


def test_plain_call_with_explicitly_sharded_inputs():
    """`fa.flex_attention` itself, under `jit`, on inputs sharded over batch and
    heads on `Explicit` mesh axes: each device runs the backend on its shard (no
    collective in the forward pass), the output keeps the inputs' sharding, and
    results and gradients equal the reference's."""
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    length = 40
    q, k, v = _inputs(length)
    bm = _mask("documents", length)
    spec = NamedSharding(mesh, PartitionSpec("data", "model"))
    sharded = tuple(jax.device_put(x, spec) for x in (q, k, v))
    attention = lambda q, k, v, s: fa.flex_attention(q, k, v, s, bm, return_lse=True)
    compiled = jax.jit(attention).lower(*sharded, _alibi()).compile()
    assert _collectives(compiled.as_text()) == {}
    out, lse = compiled(*sharded, _alibi())
    assert jax.typeof(out).sharding.spec[:2] == ("data", "model")
    _compare(attention, *sharded, _alibi(), bm, 1e-9, 1e-10)


# The Pallas kernels (here `triton`, interpreted) under `jit` with inputs sharded on
# `Auto` mesh axes: a partitioning rule runs them on each device's shard.
TRITON = {"triton": {"interpret": True, "block_q": 16, "block_kv": 16}}
TRITON["triton"] |= {"bwd_block_q": 16, "bwd_block_kv": 16}


def _auto_mesh(shape, names):
    return jax.make_mesh(
        shape, names, axis_types=(jax.sharding.AxisType.Auto,) * len(shape)
    )


@pytest.mark.parametrize(
    "spec,hkv,mod",
    [
        (("data", "model"), H, _alibi),
        (("data", "model"), H, _table),  # learnable table: its gradient psummed
        (("data", None), H, _alibi),
        ((None, "model"), 2, _alibi),  # GQA: 2 kv heads over 2 devices
        (("data", "model"), 1, _alibi),  # 1 kv head: heads stay whole (k, v gathered)
    ],
    ids=["batch_heads", "batch_heads_table", "batch", "heads_gqa", "heads_indivisible"],
)
def test_kernels_run_per_shard_on_auto_meshes(spec, hkv, mod):
    """`fa.flex_attention` with a kernel backend on inputs sharded over batch and
    heads on `Auto` axes (plain `jit`, `NamedSharding` inputs): no collective of
    floats in the forward pass (but where the key/value heads cannot follow the
    query heads), only the all-reduce of the score-mod parameter gradients in the
    backward pass, the output sharded like q; results and gradients equal the
    float64 reference (the mods see global batch and head indices: documents per
    batch row, ALiBi slopes or table rows per head)."""
    mesh = _auto_mesh((2, 4) if hkv != 2 else (4, 2), ("data", "model"))
    length = 56
    q, k, v = _inputs(length, hkv=hkv, dtype=jnp.float32)
    bm = _mask("documents", length, block_size=16)
    q_spec = NamedSharding(mesh, PartitionSpec(*spec))
    kv_spec = q_spec if hkv != 1 else NamedSharding(mesh, PartitionSpec(spec[0]))
    q = jax.device_put(q, q_spec)
    k, v = (jax.device_put(x, kv_spec) for x in (k, v))
    score_mod = mod(jnp.float32)

    def attention(q, k, v, s):
        return fa.flex_attention(
            q, k, v, s, bm, enable_gqa=hkv != H, return_lse=True,
            backend="triton", kernel_options=TRITON,
        )  # fmt: skip

    compiled = jax.jit(attention).lower(q, k, v, score_mod).compile()
    out, lse = compiled(q, k, v, score_mod)
    if hkv != 1:
        assert _collectives(compiled.as_text(), floats_only=True) == {}
        for x in (out, lse):
            assert (*x.sharding.spec, None, None)[:2] == spec
    grads = _loss(attention).lower(q, k, v, score_mod).compile()
    ops = _collectives(grads.as_text(), floats_only=True)
    if hkv != 1:
        assert set(ops) <= {"all-reduce"}, ops  # d(slopes), and the loss's own sum
    _compare(attention, q, k, v, score_mod, bm, 2e-4, 2e-5, gqa=hkv != H)


def test_kernels_per_shard_under_vmap():
    """`MultiheadFlexAttention` (its kernels interpreted), `vmap`ped over a batch
    sharded over 8 devices: each device maps over its own examples (no collective of
    floats in the forward pass), the output stays sharded, and the forward pass and
    the gradients of the layer's parameters (learnable ALiBi slopes included) equal
    the unsharded call's."""
    mesh = _auto_mesh((8,), ("data",))
    layer = fa.nn.MultiheadFlexAttention(
        num_heads=H,
        query_size=16,
        score_mod=fa.score_mods.Alibi(fa.score_mods.alibi_slopes(H)),
        block_size=16,
        backend="triton",
        kernel_options=TRITON,
        dtype=jnp.float32,
        key=jax.random.key(0),
    )
    x = jax.random.normal(jax.random.key(1), (8, 32, 16), jnp.float32)
    causal = fa.masks.causal_mask
    params, static = eqx.partition(layer, eqx.is_array)

    @jax.jit
    def call(params, x):
        layer = eqx.combine(params, static)
        return jax.vmap(lambda x: layer(x, x, x, mask_mod=causal))(x)

    loss = jax.jit(jax.grad(lambda params, x: jnp.sum(call(params, x) ** 2)))
    want, grads_want = call(params, x), loss(params, x)
    x = jax.device_put(x, NamedSharding(mesh, PartitionSpec("data")))
    compiled = call.lower(params, x).compile()
    assert _collectives(compiled.as_text(), floats_only=True) == {}
    out = compiled(params, x)
    assert out.sharding.spec[:1] == ("data",)
    np.testing.assert_allclose(out, want, 1e-5, 1e-5)
    grads = loss(params, x)
    for g, g_want in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_want)):
        np.testing.assert_allclose(g, g_want, 1e-4, 1e-5)
