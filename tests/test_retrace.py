"""A fresh score-mod closure per call retraces `jit` every call: flex_attention says
so once, naming the fix, and stays quiet where closures are new for a good reason."""

import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import numpy_attention, random_qkv

import eqx_flexattn as fa
from eqx_flexattn import _retrace


@pytest.fixture
def qkv():
    return random_qkv(jax.random.key(0), 1, 2, 2, 16, 16, 8)


@pytest.fixture(autouse=True)
def _fresh_state(monkeypatch):
    monkeypatch.setattr(_retrace, "_warned", False)
    monkeypatch.setattr(_retrace, "_SITES", {})


def _quiet(run):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run()
    assert not _retrace._warned


def test_fresh_closures_per_call_warn_once_with_the_fix(qkv):
    q, k, v = qkv
    attention = eqx.filter_jit(fa.flex_attention)
    with pytest.warns(UserWarning, match="traced 3 times from this line") as record:
        for step in range(4):  # PyTorch style: a new closure for every call
            bias = jnp.arange(2.0) * step
            out = attention(q, k, v, lambda s, b, h, qi, ki: s + bias[h])
            want, _ = numpy_attention(
                q, k, v, score_fn=lambda s, b, h, qi, ki: s + h * step
            )
            np.testing.assert_allclose(out, want, atol=1e-12)
    (warning,) = [w for w in record if "traced" in str(w.message)]
    message = str(warning.message)
    assert "`score_mod` function `" in message and "<lambda>" in message
    assert "eqx.Module" in message and "inside the function you jit" in message
    assert warning.filename == __file__  # points at the user's call


def test_fresh_block_mask_closures_warn_too(qkv):
    q, k, v = qkv
    with pytest.warns(UserWarning, match="new `mask_mod` function"):
        for window in (2, 3, 4):
            mask = lambda b, h, qi, ki: jnp.abs(qi - ki) <= window
            bm = fa.create_block_mask(mask, None, None, 16, 16, block_size=8)
            eqx.filter_eval_shape(fa.flex_attention, q, k, v, block_mask=bm)


def test_reused_functions_and_modules_do_not_warn(qkv):
    q, k, v = qkv

    def bias_mod(s, b, h, qi, ki):
        return s + 0.5 * h

    def run():
        for _ in range(4):  # the same function object, traced again
            eqx.filter_eval_shape(fa.flex_attention, q, k, v, bias_mod)
        for step in range(4):  # a module: data, never a new program
            alibi = fa.score_mods.Alibi(jnp.arange(2.0) * step)
            eqx.filter_eval_shape(fa.flex_attention, q, k, v, alibi)

    _quiet(run)


def test_closures_built_inside_the_trace_do_not_warn(qkv):
    q, k, v = qkv

    def model(q, k, v, biases):
        for bias in biases:  # one closure per layer, over traced values
            scale = float(len(biases))
            q = fa.flex_attention(q, k, v, lambda s, b, h, qi, ki: s + bias[h] / scale)
        return q

    def layers(q, k, v):
        for i in range(2):  # closures of one code in one trace, no traced values
            q = fa.flex_attention(q, k, v, lambda s, b, h, qi, ki: s + i)
        return q

    def run():
        for step in range(3):  # each a new trace with new closures
            jax.eval_shape(model, q, k, v, [jnp.ones(2) * step] * 2)
            shorter = random_qkv(jax.random.key(step), 1, 2, 2, 12 - step, 16, 8)
            jax.eval_shape(layers, *shorter)  # new shapes: a retrace jit needs

    _quiet(run)
