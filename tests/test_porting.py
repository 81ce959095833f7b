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
        f = lambda q: fa.flex_attention(q, *qkv[1:], enable_gqa=True)
        jax.eval_shape(f, qkv[0])
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


def test_python_if_in_mask_mod_gets_mask_advice():
    def prefix_or_causal(b, h, q_idx, kv_idx):
        if kv_idx < 4:
            return True
        return q_idx >= kv_idx

    with pytest.raises(TypeError, match="mask_mod `") as info:
        fa.create_block_mask(prefix_or_causal, None, None, L, L)
    message = str(info.value)
    assert "return the condition itself, `q_idx >= kv_idx`" in message
    assert "score" not in message.split("(JAX:")[0]  # no score-mod advice
    # The advice, followed, gives the mask a numpy loop gives.
    fixed = lambda b, h, q_idx, kv_idx: (kv_idx < 4) | (q_idx >= kv_idx)
    dense = fa.create_mask(fixed, None, None, L, L)[0, 0]
    want = [[kv < 4 or q >= kv for kv in range(L)] for q in range(L)]
    np.testing.assert_array_equal(dense, np.array(want))


def _linearized(f, primals, tangents):
    out, lin = jax.linearize(f, *primals)
    return out, lin(*tangents)


@pytest.mark.parametrize("mode", ["jvp", "linearize"])
@pytest.mark.parametrize("jit", [False, True])
def test_forward_mode_matches_reference(jit, mode, qkv, causal):
    q, k, v = qkv
    tangents = random_qkv(jax.random.key(4), B, HQ, HKV, L, L, D)
    forward = jax.jvp if mode == "jvp" else _linearized

    def jvp(backend):
        f = lambda q, k, v: fa.flex_attention(
            q, k, v, plain_mod, causal, enable_gqa=True, backend=backend
        )
        run = lambda: forward(f, qkv, tangents)
        return jax.jit(run)() if jit else run()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got, want = jvp("auto"), jvp("reference")
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=1e-12)


@pytest.mark.parametrize("mode", ["jvp", "linearize"])
def test_forward_mode_error_names_what_works(mode, qkv, monkeypatch):
    from eqx_flexattn import _backends

    class Kernel(_backends.XlaBackend):  # a backend with only a reverse-mode rule
        name = "kernel"

    monkeypatch.setitem(_backends.BACKENDS, "kernel", Kernel())
    f = lambda q: fa.flex_attention(q, *qkv[1:], enable_gqa=True, backend="kernel")
    forward = jax.jvp if mode == "jvp" else _linearized
    with pytest.raises(TypeError, match="backend='kernel'.*backend='reference'"):
        forward(f, (qkv[0],), (qkv[0],))


def test_reverse_mode_keeps_the_fused_backward(qkv, monkeypatch):
    # jax.vjp and jax.grad trace with jax.linearize's tracer too: they must still
    # run the backend's fused backward pass, not differentiate its loops.
    from eqx_flexattn._backends import XlaBackend

    calls = []
    backward = XlaBackend.backward
    spy = lambda self, *args: calls.append(1) or backward(self, *args)
    monkeypatch.setattr(XlaBackend, "backward", spy)
    f = lambda q: fa.flex_attention(q, *qkv[1:], enable_gqa=True, backend="xla")
    dout = jnp.ones(qkv[0].shape, qkv[0].dtype)
    jax.make_jaxpr(lambda q: jax.vjp(f, q)[1](dout))(qkv[0])
    jax.make_jaxpr(jax.grad(lambda q: f(q).sum()))(qkv[0])
    assert len(calls) == 2


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
        fa.and_masks(masks.causal_mask, lambda b, h, q, kv: q != 5),
        None,
        None,
        L,
        L,
        block_size=4,
    )
    out, aux = eqx.filter_jit(fa.flex_attention)(
        q,
        k,
        v,
        plain_mod,
        bm,
        enable_gqa=True,
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


# PyTorch's spellings ----------------------------------------------------------------


def test_create_block_mask_pytorch_arguments(monkeypatch):
    from eqx_flexattn import _block_mask

    monkeypatch.setattr(_block_mask, "_noted_device", False)
    want = fa.create_block_mask(masks.causal_mask, None, None, L, L, block_size=4)
    with pytest.warns(UserWarning, match="ignores `device='cuda'`.*jax.device_put"):
        got = fa.create_block_mask(
            masks.causal_mask, None, None, L, L, "cuda", BLOCK_SIZE=4, _compile=True
        )
    assert eqx.tree_equal(got, want)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # noted once per process
        got = fa.create_block_mask(
            masks.causal_mask, None, None, L, L, device="cpu", BLOCK_SIZE=(4, 4)
        )
        dense = fa.create_mask(masks.causal_mask, None, None, L, L, device="cuda")
    assert eqx.tree_equal(got, want)
    np.testing.assert_array_equal(dense, fa.create_mask(masks.causal_mask, 1, 1, L, L))
    assert fa.create_block_mask(masks.causal_mask, None, None, 300, 300).BLOCK_SIZE == (
        128,
        128,
    )
    with pytest.raises(TypeError, match="not both"):
        fa.create_block_mask(
            masks.causal_mask, None, None, L, L, block_size=4, BLOCK_SIZE=4
        )
    with pytest.raises(ValueError, match="`BLOCK_SIZE` must be positive"):
        fa.create_block_mask(masks.causal_mask, None, None, L, L, BLOCK_SIZE=0)


def test_block_mask_pytorch_methods(causal):
    bm = causal
    assert bm.BLOCK_SIZE == bm.block_size == (4, 4)
    assert bm.numel() == 1 * 1 * L * L
    assert eqx.tree_equal(bm._adjust(8, 10), bm.adjust(8, 10))
    assert bm.to_string() == repr(bm)
    flat = bm.as_tuple()
    assert flat[:2] == (L, L) and flat[-3:-1] == (4, 4) and flat[-1] is bm.mask_mod
    names = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices")
    names += ("q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices")
    for x, name in zip(flat[2:-3], names, strict=True):
        assert x is getattr(bm, name)
    nested = bm.as_tuple(flatten=False)
    assert nested[0] == (L, L) and nested[-2] == (4, 4) and len(nested) == 11
    (num, idx), (full_num, full_idx) = bm.block_lists()
    rebuilt = fa.BlockMask.from_kv_blocks(
        num,
        idx,
        full_num,
        full_idx,
        BLOCK_SIZE=4,
        mask_mod=masks.causal_mask,
        compute_q_blocks=False,
    )
    assert eqx.tree_equal(rebuilt, bm)


# Papercuts --------------------------------------------------------------------------


def test_score_mod_parameters_are_strongly_typed():
    optax = pytest.importorskip("optax")
    params = [
        score_mods.Alibi([0.5, 0.25]),
        score_mods.Alibi(jnp.broadcast_to(0.5, (2,))),
        score_mods.generate_alibi_bias(2),
        score_mods.HeadBias(jnp.asarray(0.0)),
        score_mods.HeadBias(jnp.array([1, 2])),
        score_mods.RelativePositionBias(2, 4, table=jnp.broadcast_to(0.0, (2, 7))),
    ]
    for mod in params:
        leaf = jax.tree_util.tree_leaves(mod)[0]
        assert not leaf.weak_type and jnp.issubdtype(leaf.dtype, jnp.floating), mod
    assert score_mods.Alibi(jnp.ones(2, jnp.float64)).slopes.dtype == jnp.float64

    q, k, v = random_qkv(jax.random.key(5), 1, 2, 2, 8, 8, 4, dtype=jnp.float32)
    mod = score_mods.compose(
        score_mods.Alibi([0.5, 0.25]), score_mods.HeadBias(jnp.asarray(0.0))
    )
    optim = optax.adam(1e-2)
    state = optim.init(eqx.filter(mod, eqx.is_inexact_array))
    traces = []

    @eqx.filter_jit
    def step(mod, state):
        traces.append(None)
        loss = lambda m: jnp.sum(fa.flex_attention(q, k, v, m) ** 2)
        updates, state = optim.update(jax.grad(loss)(mod), state)
        return eqx.apply_updates(mod, updates), state

    for _ in range(3):
        mod, state = step(mod, state)
    assert len(traces) == 1  # no recompilation after the first update


def test_explain_backend_lists_every_backend(qkv):
    from eqx_flexattn._backends import BACKENDS

    text = fa.explain_backend(*qkv, enable_gqa=True)
    lines = text.splitlines()
    assert lines[0].startswith("backend: ")
    named = [line.split(": ")[1] for line in lines[1:]]
    assert sorted(named + [lines[0].split(": ")[1]]) == sorted(BACKENDS)
    assert all(line.startswith(("declined: ", "other: ")) for line in lines[1:])
    text = fa.explain_backend(*qkv, enable_gqa=True, backend="reference")
    assert text.splitlines()[0] == "backend: reference"
    lines = text.splitlines()
    assert any(line.startswith("other: xla: accepts these inputs") for line in lines)
