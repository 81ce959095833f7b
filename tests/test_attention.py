"""flex_attention forward: every backend against independent oracles."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import backend_params, numpy_attention, random_qkv

import eqx_flexattn as fa
from eqx_flexattn import masks, score_mods


KERNEL_BACKENDS = backend_params(reference=False)
ALL_BACKENDS = backend_params()


def np_causal(b, h, q, kv):
    return q >= kv


def head_window(b, h, q, kv):
    return (jnp.abs(q - kv) <= 4 + 3 * h) & ((q + h) % 7 != 0)


def np_head_window(b, h, q, kv):
    return (np.abs(q - kv) <= 4 + 3 * h) & ((q + h) % 7 != 0)


def np_alibi(slopes):
    slopes = np.asarray(slopes)
    return lambda s, b, h, q, kv: s + slopes[h] * (kv - q)


# (name, B, Hq, Hkv, Lq, Lkv, D, Dv, block_size, mask_mod, np_mask, per_head_mask)
SHAPES = [
    ("square", 2, 2, 2, 64, 64, 16, 16, 16, masks.causal_mask, np_causal, False),
    ("ragged", 1, 4, 2, 37, 53, 8, 12, (8, 16), masks.causal_mask, np_causal, False),
    ("head_mask", 2, 3, 3, 40, 40, 8, 8, 8, head_window, np_head_window, True),
    ("gqa_long_kv", 1, 4, 1, 20, 100, 8, 4, 16, None, None, False),
]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
def test_matches_numpy(backend, shape, getkey):
    _, b, hq, hkv, lq, lkv, d, dv, bs, mask_mod, np_mask, per_head = shape
    q, k, v = random_qkv(getkey(), b, hq, hkv, lq, lkv, d, dv)
    slopes = jnp.linspace(0.1, 0.9, hq)
    bm = None
    if mask_mod is not None:
        bm = fa.create_block_mask(
            mask_mod, None, hq if per_head else None, lq, lkv, block_size=bs
        )
    out, lse = fa.flex_attention(
        q,
        k,
        v,
        score_mods.Alibi(slopes),
        bm,
        enable_gqa=hq != hkv,
        return_lse=True,
        backend=backend,
    )
    want_out, want_lse = numpy_attention(
        q, k, v, score_fn=np_alibi(slopes), mask_fn=np_mask
    )
    assert out.shape == (b, hq, lq, dv) and out.dtype == jnp.float64
    assert lse.shape == (b, hq, lq)
    np.testing.assert_allclose(out, want_out, atol=1e-10, rtol=1e-10)
    np.testing.assert_allclose(lse, want_lse, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_scale_and_no_mods(backend, getkey):
    q, k, v = random_qkv(getkey(), 1, 2, 2, 30, 30, 8)
    out = fa.flex_attention(q, k, v, scale=0.3, backend=backend)
    np.testing.assert_allclose(out, numpy_attention(q, k, v, scale=0.3)[0], atol=1e-12)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_batch_dependent_mask(backend, getkey):
    """B of the mask = B of q, with document ids per batch element."""
    ids = jnp.array([[0] * 10 + [1] * 14, [0] * 3 + [1] * 9 + [2] * 12])
    mod = fa.and_masks(masks.causal_mask, masks.document_mask(ids))
    bm = fa.create_block_mask(mod, 2, None, 24, 24, block_size=8)
    q, k, v = random_qkv(getkey(), 2, 2, 2, 24, 24, 8)
    np_ids = np.asarray(ids)
    want = numpy_attention(
        q,
        k,
        v,
        mask_fn=lambda b, h, qi, kv: (qi >= kv) & (np_ids[b, qi] == np_ids[b, kv]),
    )[0]
    np.testing.assert_allclose(
        fa.flex_attention(q, k, v, block_mask=bm, backend=backend), want, atol=1e-12
    )


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_decoding_single_query(backend, getkey):
    q, k, v = random_qkv(getkey(), 2, 4, 2, 1, 300, 16)
    out = fa.flex_attention(q, k, v, enable_gqa=True, backend=backend)
    np.testing.assert_allclose(out, numpy_attention(q, k, v)[0], atol=1e-12)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_fully_masked_rows(backend, getkey):
    """Rows that see nothing: output 0, lse -inf, no NaN anywhere."""
    mod = lambda b, h, q, kv: (q % 3 != 1) & (kv <= q)
    bm = fa.create_block_mask(mod, None, None, 24, 24, block_size=8)
    q, k, v = random_qkv(getkey(), 1, 2, 2, 24, 24, 8)
    out, lse = fa.flex_attention(
        q, k, v, block_mask=bm, return_lse=True, backend=backend
    )
    rows = np.arange(24) % 3 == 1
    assert not np.isnan(np.asarray(out)).any()
    np.testing.assert_array_equal(np.asarray(out)[:, :, rows], 0.0)
    assert np.all(np.asarray(lse)[:, :, rows] == -np.inf)
    assert np.all(np.isfinite(np.asarray(lse)[:, :, ~rows]))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_low_precision(backend, dtype, getkey):
    q, k, v = random_qkv(getkey(), 1, 2, 2, 48, 48, 16, dtype=dtype)
    bm = fa.create_block_mask(masks.causal_mask, None, None, 48, 48, block_size=16)
    mod = score_mods.SoftCap(20.0)
    out, lse = fa.flex_attention(q, k, v, mod, bm, return_lse=True, backend=backend)
    assert out.dtype == dtype and lse.dtype == jnp.float32
    want_out, want_lse = numpy_attention(
        q, k, v, score_fn=lambda s, *_: 20 * np.tanh(s / 20), mask_fn=np_causal
    )
    tol = {jnp.float32: 1e-5, jnp.bfloat16: 3e-2, jnp.float16: 5e-3}[dtype]
    np.testing.assert_allclose(
        np.asarray(out, np.float64), want_out, atol=tol, rtol=tol
    )
    np.testing.assert_allclose(lse, want_lse, atol=tol, rtol=tol)


def test_closure_over_traced_array(getkey):
    """A plain function closing over a traced array works under jit."""
    q, k, v = random_qkv(getkey(), 1, 2, 2, 16, 16, 8)

    @jax.jit
    def f(q, k, v, bias):
        return fa.flex_attention(q, k, v, lambda s, b, h, qi, kv: s + bias[h])

    bias = jnp.array([0.5, -1.0])
    want = numpy_attention(
        q, k, v, score_fn=lambda s, b, h, *_: s + np.asarray(bias)[h]
    )[0]
    np.testing.assert_allclose(f(q, k, v, bias), want, atol=1e-12)


def test_auto_falls_back_and_explains(getkey, monkeypatch):
    """`auto` skips a backend that declines, and says why."""
    from eqx_flexattn import _backends

    class Declining(_backends.XlaBackend):
        name = "declining"

        def check(self, problem):
            raise NotImplementedError("head dim 4 is too small")

        def forward(self, problem):
            raise AssertionError("a declining backend must not run")

    monkeypatch.setitem(_backends.BACKENDS, "declining", Declining())
    monkeypatch.setattr(_backends, "AUTO_ORDER", ("declining", "xla"))
    q, k, v = random_qkv(getkey(), 1, 1, 1, 8, 8, 4)
    text = fa.explain_backend(q, k, v)
    lines = text.splitlines()
    assert lines[:2] == [
        "backend: xla",
        "declined: declining: head dim 4 is too small",
    ]
    # Then every other registered backend, with what it would do.
    others = {line.split(": ")[1]: line for line in lines[2:]}
    assert set(others) == set(_backends.BACKENDS) - {"xla", "declining"}
    assert others["reference"] == (
        "other: reference: accepts these inputs; not tried by `auto` "
        "(backend='reference')"
    )
    shapes = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v)]
    assert fa.explain_backend(*shapes) == text
    with pytest.raises(ValueError, match="Unknown backend 'tpu'"):
        fa.explain_backend(*shapes, backend="tpu")
    np.testing.assert_allclose(fa.flex_attention(q, k, v), numpy_attention(q, k, v)[0])
    monkeypatch.setattr(_backends, "AUTO_ORDER", ("declining",))
    with pytest.raises(NotImplementedError, match="No backend can run"):
        fa.flex_attention(q, k, v)


def test_document_ids_do_not_retrace(getkey):
    q, k, v = random_qkv(getkey(), 1, 2, 2, 32, 32, 8)
    traces = []

    @jax.jit
    def f(q, k, v, ids):
        traces.append(None)
        mod = fa.and_masks(masks.causal_mask, masks.document_mask(ids))
        bm = fa.create_block_mask(mod, None, None, 32, 32, block_size=8)
        return fa.flex_attention(q, k, v, block_mask=bm)

    for n in (2, 3, 5):
        ids = jnp.arange(32) * n // 32
        out = f(q, k, v, ids)
        np_ids = np.asarray(ids)
        want = numpy_attention(
            q,
            k,
            v,
            mask_fn=lambda b, h, qi, kv: (qi >= kv) & (np_ids[qi] == np_ids[kv]),
        )[0]
        np.testing.assert_allclose(out, want, atol=1e-12)
    assert len(traces) == 1


def test_no_stale_results_from_plain_functions(getkey):
    """Called eagerly, a mod that reads a global sees its current value."""
    q, k, v = random_qkv(getkey(), 1, 2, 2, 16, 16, 8)
    bias = {"value": np.array([0.0, 0.0])}

    def mod(s, b, h, qi, kv):
        return s + jnp.asarray(bias["value"])[h] * (kv - qi)

    first = fa.flex_attention(q, k, v, mod)
    bias["value"] = np.array([0.5, -0.5])
    second = fa.flex_attention(q, k, v, mod)
    want = numpy_attention(
        q, k, v, score_fn=lambda s, b, h, qi, kv: s + bias["value"][h] * (kv - qi)
    )[0]
    np.testing.assert_allclose(second, want, atol=1e-12)
    assert not np.allclose(first, second)


@pytest.mark.parametrize("row_groups", [1, 3])
def test_row_groups_option(row_groups, getkey):
    q, k, v = random_qkv(getkey(), 2, 2, 2, 40, 40, 8)
    bm = fa.create_block_mask(masks.causal_mask, None, None, 40, 40, block_size=8)
    out = fa.flex_attention(
        q, k, v, block_mask=bm, kernel_options={"row_groups": row_groups}
    )
    np.testing.assert_allclose(
        out, numpy_attention(q, k, v, mask_fn=np_causal)[0], atol=1e-12
    )
    with pytest.raises(ValueError, match="row_groups.*positive int, got 0"):
        fa.flex_attention(q, k, v, kernel_options={"row_groups": 0})


def test_row_groups_bound_the_work():
    """Grouping rows by list length: causal costs about (1 + 1/G) / 2 of dense."""
    from eqx_flexattn._backends.xla import row_groups

    m = 64
    lengths = jnp.asarray(np.random.default_rng(0).permutation(np.arange(1, m + 1)))
    for g, bound in ((1, 1.0), (4, 0.5 * (1 + 1 / 4) + 1 / m)):
        groups = row_groups(lengths, g)
        assert sorted(np.concatenate([np.asarray(x) for x in groups])) == list(range(m))
        work = sum(len(x) * int(lengths[x].max()) for x in groups)
        assert work <= bound * m * m, (g, work)


def test_block_mask_module_under_jit_does_not_retrace(getkey):
    q, k, v = random_qkv(getkey(), 1, 2, 2, 32, 32, 8)
    f = jax.jit(lambda q, k, v, bm: fa.flex_attention(q, k, v, block_mask=bm))
    for n in (2, 4):
        mod = masks.document_mask(jnp.arange(32) * n // 32)
        f(q, k, v, fa.create_block_mask(mod, None, None, 32, 32, block_size=8))
    assert f._cache_size() == 1


# ---------------------------------------------------------------- bad input


def _qkv(b=1, hq=2, hkv=2, lq=8, lkv=8, d=4, dv=4, dtype=jnp.float32):
    return (
        jnp.zeros((b, hq, lq, d), dtype),
        jnp.zeros((b, hkv, lkv, d), dtype),
        jnp.zeros((b, hkv, lkv, dv), dtype),
    )


def test_error_rank():
    q, k, v = _qkv()
    with pytest.raises((TypeError, ValueError), match="query"):
        fa.flex_attention(q[0], k, v)


def test_error_dtypes():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="same dtype.*query float32, key bfloat16"):
        fa.flex_attention(q, k.astype(jnp.bfloat16), v)
    qi, ki, vi = _qkv(dtype=jnp.int32)
    with pytest.raises(TypeError, match="query"):
        fa.flex_attention(qi, ki, vi)


def test_error_mismatched_dims():
    q, k, v = _qkv()
    with pytest.raises((TypeError, ValueError), match="value"):
        fa.flex_attention(q, k, v[:, :, :5])
    q2, k2, v2 = _qkv(d=4)
    with pytest.raises((TypeError, ValueError), match="key"):
        fa.flex_attention(q2, k2[..., :3], v2)
    q3, k3, v3 = _qkv(b=2)
    with pytest.raises((TypeError, ValueError), match="key"):
        fa.flex_attention(q3, k3[:1], v3[:1])


def test_error_heads():
    q, k, v = _qkv(hq=4, hkv=2)
    with pytest.raises(
        ValueError,
        match=r"Hq=4 heads but `key`/`value` have Hkv=2: set enable_gqa=True",
    ):
        fa.flex_attention(q, k, v)
    q, k, v = _qkv(hq=3, hkv=2)
    with pytest.raises(ValueError, match="Hq=3 must be a multiple of .* Hkv=2"):
        fa.flex_attention(q, k, v, enable_gqa=True)


def test_error_block_mask_lengths():
    q, k, v = _qkv(lq=8, lkv=8)
    bm = fa.create_block_mask(masks.causal_mask, None, None, 16, 8, block_size=4)
    with pytest.raises(
        ValueError, match=r"built for \(Lq, Lkv\)=\(16, 8\).*Lq=8, Lkv=8.*adjust"
    ):
        fa.flex_attention(q, k, v, block_mask=bm)
    bm = fa.create_block_mask(masks.causal_mask, 3, None, 8, 8, block_size=4)
    with pytest.raises(ValueError, match=r"shape \(3, 1, 8, 8\).*B=1, Hq=2"):
        fa.flex_attention(q, k, v, block_mask=bm)
    with pytest.raises(TypeError, match="block_mask"):
        fa.flex_attention(q, k, v, block_mask=np.ones((8, 8), bool))


def test_error_score_mod_output():
    q, k, v = _qkv()
    with pytest.raises(
        TypeError,
        match="score_mod .* must return a floating-point score, got dtype bool",
    ):
        fa.flex_attention(q, k, v, lambda s, b, h, qi, kv: s > 0)
    table = jnp.zeros((2, 8))
    with pytest.raises(ValueError, match=r"score_mod .* returned shape \(8,\)"):
        fa.flex_attention(q, k, v, lambda s, b, h, qi, kv: s + table[h])
    with pytest.raises(TypeError, match="could not be called as `score_mod"):
        fa.flex_attention(q, k, v, lambda s, qi, kv: s)


def test_error_options():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="Unknown backend 'cuda'"):
        fa.flex_attention(q, k, v, backend="cuda")
    with pytest.raises(ValueError, match="key 'BLOK_M' is not an option.*'BLOCK_M'"):
        fa.flex_attention(q, k, v, backend="xla", kernel_options={"BLOK_M": 64})
    with pytest.raises(TypeError, match="kernel_options"):
        fa.flex_attention(q, k, v, kernel_options=[("row_groups", 2)])
    with pytest.raises(TypeError, match="scale"):
        fa.flex_attention(q, k, v, scale="big")
