"""A new user's first hour: compiling flex_attention, the eager warning, errors for
common mistakes, forward mode, learnable scale, and PyTorch's spellings."""

import inspect
import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import numpy_attention, random_qkv

import eqx_flexattn as fa
from eqx_flexattn import _attention, masks, score_mods


B, HQ, HKV, L, D = 1, 2, 1, 12, 4
# flex_attention without the runtime type checking the test suite switches on (that
# would reject a traced flag first, naming it, but without the advice): what a user
# sees by default.
unchecked_flex_attention = inspect.unwrap(fa.flex_attention)
STATIC = ("score_mod", "return_lse", "enable_gqa", "backend")


def plain_mod(s, b, h, q, kv):
    return s - 0.1 * jnp.abs(q - kv)


@pytest.fixture(scope="module")
def qkv():
    return random_qkv(jax.random.key(3), B, HQ, HKV, L, L, D)


@pytest.fixture(scope="module")
def causal():
    return fa.create_block_mask(masks.causal_mask, None, None, L, L, block_size=4)


# Every argument at its default and at one other value, and all at once: each
# call is compiled by `eqx.filter_jit` and by `jax.jit` with `static_argnames`.
VARIANTS = {
    "defaults": {},
    "plain_score_mod": dict(score_mod=plain_mod),
    "module_score_mod": dict(score_mod=score_mods.Alibi(jnp.array([0.5, 0.25]))),
    "block_mask": dict(block_mask=True),
    "scale": dict(scale=0.7),
    "return_lse": dict(return_lse=True),
    "backend_xla": dict(backend="xla"),
    "backend_reference": dict(backend="reference"),
    "kernel_options": dict(kernel_options={"row_groups": 2}),
    "return_aux": dict(return_aux=fa.AuxRequest(lse=True, max_scores=True)),
    "all": dict(
        score_mod=plain_mod,
        block_mask=True,
        scale=0.7,
        return_lse=True,
        backend="xla",
        kernel_options={"row_groups": 2},
    ),
}


def _call(fn, qkv, causal, kwargs):
    kwargs = dict(kwargs, enable_gqa=True)
    if kwargs.pop("block_mask", False):
        kwargs["block_mask"] = causal
    return fn(*qkv, **kwargs)


@pytest.mark.parametrize("how", ["filter_jit", "jax_jit"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_compiled_forms_match_reference(variant, how, qkv, causal):
    kwargs = VARIANTS[variant]
    if how == "filter_jit":
        compiled = eqx.filter_jit(fa.flex_attention)
        got = _call(compiled, qkv, causal, kwargs)
    else:
        options = kwargs.get("kernel_options")
        kwargs = {k: v for k, v in kwargs.items() if k != "kernel_options"}
        static = STATIC + (("return_aux",) if "return_aux" in kwargs else ())
        if isinstance(kwargs.get("score_mod"), eqx.Module):  # data: traced by jit
            static = tuple(n for n in static if n != "score_mod")

        def attention(*args, **kw):  # a dict can't be static: close over it
            return fa.flex_attention(*args, **kw, kernel_options=options)

        compiled = jax.jit(attention, static_argnames=static)
        got = _call(compiled, qkv, causal, kwargs)
    # The dense reference backend, eagerly: cheap at this size.
    want = _call(fa.flex_attention, qkv, causal, {**kwargs, "backend": "reference"})
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(g, w, atol=1e-12)


@pytest.mark.parametrize("name", ["return_lse", "enable_gqa"])
def test_bare_jit_names_static_argument(name, qkv):
    q, k, v = qkv
    with pytest.raises(TypeError, match=f"`{name}` is a traced value") as info:
        jax.jit(unchecked_flex_attention)(q, k, v, **{name: True})
    assert "eqx.filter_jit(fa.flex_attention)" in str(info.value)
    assert "static_argnames" in str(info.value)


def test_bare_jit_names_kernel_options(qkv):
    with pytest.raises(TypeError, match="`kernel_options` holds traced values"):
        jax.jit(unchecked_flex_attention, static_argnames="enable_gqa")(
            *qkv, enable_gqa=True, kernel_options={"a": 1}
        )


def test_flags_must_be_bools(qkv):
    with pytest.raises(TypeError, match="`return_lse` must be a bool"):
        unchecked_flex_attention(*qkv, enable_gqa=True, return_lse="yes")


def test_eager_call_warns_once(qkv, monkeypatch):
    monkeypatch.setattr(_attention, "_warned_eager", False)
    with pytest.warns(UserWarning, match="ran eagerly") as record:
        fa.flex_attention(*qkv, enable_gqa=True)
        fa.flex_attention(*qkv, enable_gqa=True)
        jax.grad(lambda q: fa.flex_attention(q, *qkv[1:], enable_gqa=True).sum())(
            qkv[0]
        )
    eager = [w for w in record if "ran eagerly" in str(w.message)]
    assert len(eager) == 1
    assert "eqx.filter_jit(fa.flex_attention)" in str(eager[0].message)
    assert eager[0].filename == __file__  # points at the user's call


def test_compiled_call_does_not_warn(qkv, monkeypatch):
    monkeypatch.setattr(_attention, "_warned_eager", False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        eqx.filter_jit(fa.flex_attention)(*qkv, enable_gqa=True)
        jax.eval_shape(lambda q: fa.flex_attention(q, *qkv[1:], enable_gqa=True), qkv[0])
    assert not _attention._warned_eager


@pytest.mark.parametrize("kind", ["score_mod", "mask_mod"])
def test_python_if_in_mod_says_use_where(kind, qkv):
    def score_mod(s, b, h, q, kv):
        if q >= kv:
            return s
        return s - 1.0

    def mask_mod(b, h, q, kv):
        return q >= kv and kv > 0

    with pytest.raises(TypeError, match="jnp.where") as info:
        if kind == "score_mod":
            fa.flex_attention(*qkv, score_mod, enable_gqa=True)
        else:
            fa.create_block_mask(mask_mod, None, None, L, L)
    assert f"{kind} `" in str(info.value) and "Python control flow" in str(info.value)


@pytest.mark.parametrize("jit", [False, True])
def test_forward_mode_matches_reference(jit, qkv, causal):
    q, k, v = qkv
    tangents = random_qkv(jax.random.key(4), B, HQ, HKV, L, L, D)

    def jvp(backend):
        f = lambda q, k, v: fa.flex_attention(
            q, k, v, plain_mod, causal, enable_gqa=True, backend=backend
        )
        run = lambda: jax.jvp(f, qkv, tangents)
        return jax.jit(run)() if jit else run()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got, want = jvp("auto"), jvp("reference")
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=1e-12)


def test_forward_mode_error_names_what_works(qkv, monkeypatch):
    monkeypatch.setattr(_attention, "BACKENDS", {})  # no xla to fall back to
    with pytest.raises(TypeError, match="backend='reference'"):
        jax.jvp(
            lambda q: fa.flex_attention(q, *qkv[1:], enable_gqa=True, backend="xla"),
            (qkv[0],),
            (qkv[0],),
        )


@pytest.mark.parametrize("backend", ["xla", "reference"])
def test_learnable_scale(backend, qkv, causal):
    q, k, v = qkv

    def loss(scale):
        out = fa.flex_attention(
            q, k, v, plain_mod, causal, scale=scale, enable_gqa=True, backend=backend
        )
        return jnp.sum(jnp.sin(out))

    scale = jnp.asarray(0.6)
    f = eqx.filter_jit(loss)
    np.testing.assert_allclose(f(scale), f(0.6), atol=1e-12)
    grad = eqx.filter_jit(jax.grad(loss))(scale)
    eps = 1e-6
    fd = (f(scale + eps) - f(scale - eps)) / (2 * eps)
    np.testing.assert_allclose(grad, fd, rtol=1e-6)


def test_scale_errors(qkv):
    with pytest.raises(ValueError, match="scalar"):
        fa.flex_attention(*qkv, enable_gqa=True, scale=jnp.ones(2))
    with pytest.raises(TypeError, match="scale"):
        fa.flex_attention(*qkv, enable_gqa=True, scale="0.5")


def test_return_aux_lse_and_max_scores(qkv, causal):
    q, k, v = qkv
    np_mod = lambda s, b, h, q, kv: s - 0.1 * np.abs(q - kv)
    np_mask = lambda b, h, q, kv: (q >= kv) & (q != 5)  # row 5 fully masked
    bm = fa.create_block_mask(
        fa.and_masks(masks.causal_mask, lambda b, h, q, kv: q != 5), None, None, L, L,
        block_size=4,
    )
    out, aux = eqx.filter_jit(fa.flex_attention)(
        q, k, v, plain_mod, bm, enable_gqa=True,
        return_aux=fa.AuxRequest(lse=True, max_scores=True),
    )
    assert isinstance(aux, fa.AuxOutput)
    want_out, want_lse = numpy_attention(q, k, v, score_fn=np_mod, mask_fn=np_mask)
    qq, kk = np.asarray(q), np.repeat(np.asarray(k), 2, axis=1)
    s = np.einsum("bhqd,bhkd->bhqk", qq, kk) / np.sqrt(D)
    ib, ih, iq, ik = np.ix_(*map(np.arange, s.shape))
    s = np.where(np_mask(ib, ih, iq, ik), np_mod(s, ib, ih, iq, ik), -np.inf)
    np.testing.assert_allclose(out, want_out, atol=1e-12)
    np.testing.assert_allclose(aux.lse, want_lse, atol=1e-12)
    np.testing.assert_allclose(aux.max_scores, s.max(-1), atol=1e-12)
    assert np.all(aux.max_scores[:, :, 5] == -np.inf)
    _, only = fa.flex_attention(*qkv, enable_gqa=True, return_aux=fa.AuxRequest())
    assert only == fa.AuxOutput(None, None)


def test_return_aux_errors(qkv):
    with pytest.raises(ValueError, match="not both"):
        fa.flex_attention(
            *qkv, enable_gqa=True, return_lse=True, return_aux=fa.AuxRequest(lse=True)
        )
    with pytest.raises(TypeError, match="AuxRequest"):
        fa.flex_attention(*qkv, enable_gqa=True, return_aux={"lse": True})
