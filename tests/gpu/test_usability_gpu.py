"""What a new user sees on a Hopper GPU: the backend chosen and explained (by name
too), `jax.linearize` beside the fused backward, the retrace warning with compiled
kernels, and where benchmark results go.

Off a GPU these run the `mosaic` kernels in the Pallas interpreter when called
directly (`OPTIONS`); pytest skips this folder there (tests/gpu/conftest.py).
"""

import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eqx_flexattn as fa
from eqx_flexattn import _retrace
from eqx_flexattn._backends import BACKENDS


ON_GPU = jax.devices()[0].platform == "gpu"
OPTIONS = None if ON_GPU else {"mosaic": {"interpret": True}}
L = 256 if ON_GPU else 128


def _qkv(dtype=jnp.bfloat16):
    keys = jax.random.split(jax.random.key(0), 3)
    return [jax.random.normal(k, (1, 2, L, 64), dtype) for k in keys]


def test_explain_picks_mosaic_and_explains_a_named_backend():
    bf16 = jax.ShapeDtypeStruct((1, 2, L, 64), jnp.bfloat16)
    text = fa.explain_backend(bf16, bf16, bf16, kernel_options=OPTIONS)
    assert text.splitlines()[0] == "backend: mosaic", text
    f32 = jax.ShapeDtypeStruct((1, 2, L, 64), jnp.float32)
    lines = fa.explain_backend(
        f32, f32, f32, backend="mosaic", kernel_options=OPTIONS
    ).splitlines()
    assert lines[0].startswith("backend: none (flex_attention(..., backend='mosaic')")
    assert lines[1].startswith("declined: mosaic: it takes bfloat16 or float16")
    with pytest.raises(NotImplementedError, match="backend='mosaic' can't run this"):
        fa.flex_attention(*_qkv(jnp.float32), backend="mosaic", kernel_options=OPTIONS)


def test_linearize_runs_forwards_and_grad_keeps_the_kernels(monkeypatch):
    mosaic = type(BACKENDS["mosaic"])
    calls = []
    backward = mosaic.backward
    spy = lambda self, *args: calls.append(1) or backward(self, *args)
    monkeypatch.setattr(mosaic, "backward", spy)
    q, k, v = _qkv()
    bm = fa.create_block_mask(fa.masks.causal_mask, None, None, L, L)
    alibi = fa.score_mods.generate_alibi_bias(2)

    def f(q, backend="auto"):
        return fa.flex_attention(
            q, k, v, alibi, bm, backend=backend, kernel_options=OPTIONS
        )

    t = jax.random.normal(jax.random.key(1), q.shape, q.dtype)
    got = jax.jit(lambda q, t: jax.linearize(f, q)[1](t))(q, t)
    want = jax.jit(lambda q, t: jax.jvp(f, (q,), (t,))[1])(q, t)
    np.testing.assert_allclose(np.float32(got), np.float32(want), atol=2e-2)
    f32 = lambda x: x.astype(jnp.float32)
    dense = lambda q: fa.flex_attention(
        q, f32(k), f32(v), alibi, bm, backend="reference"
    )
    oracle = jax.jvp(dense, (f32(q),), (f32(t),))[1]
    np.testing.assert_allclose(np.float32(got), oracle, atol=0.1, rtol=0.05)
    assert not calls
    jax.jit(jax.grad(lambda q: f(q).astype(jnp.float32).sum()))(q)
    assert calls  # reverse mode: the mosaic backend's own backward


def test_fresh_closures_warn_once_with_compiled_kernels(monkeypatch):
    monkeypatch.setattr(_retrace, "_warned", False)
    monkeypatch.setattr(_retrace, "_SITES", {})
    q, k, v = _qkv()
    attention = eqx.filter_jit(fa.flex_attention)
    with pytest.warns(UserWarning, match="traced 3 times from this line") as record:
        for step in range(3):
            slopes = jnp.full((2,), 0.1 * step)
            mod = lambda s, b, h, qi, ki: s + slopes[h] * (ki - qi)
            attention(q, k, v, mod, kernel_options=OPTIONS).block_until_ready()
    assert sum("traced" in str(w.message) for w in record) == 1
    monkeypatch.setattr(_retrace, "_warned", False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for step in range(3):  # the fix: a module, data under jit
            alibi = fa.score_mods.Alibi(jnp.full((2,), 0.1 * step))
            attention(q, k, v, alibi, kernel_options=OPTIONS).block_until_ready()


def test_gpu_benchmark_runs_write_the_committed_results():
    from benchmarks import impls, run

    env = impls.detect_env(quick=False)
    want = run.RESULTS if ON_GPU else run.LOCAL_RESULTS
    assert run.default_out("gpu-session", env.platform) == want, env.platform
    assert run.default_out("quick", env.platform) == run.LOCAL_RESULTS
