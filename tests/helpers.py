"""Independent oracles and input generators for the tests."""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np


def full_profile() -> bool:
    """Whether the `full` test profile runs (CI; see conftest.py)."""
    return os.environ.get("EQX_FLEXATTN_TEST_PROFILE", "default") == "full"


def examples(*, full: int, default: int) -> int:
    """A hypothesis budget: `full` examples in the full profile, else `default`."""
    return full if full_profile() else default


def random_qkv(key, b, hq, hkv, lq, lkv, d, dv=None, dtype=jnp.float64):
    dv = d if dv is None else dv
    kq, kk, kv = jax.random.split(key, 3)
    q = jax.random.normal(kq, (b, hq, lq, d), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (b, hkv, lkv, d), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (b, hkv, lkv, dv), jnp.float32).astype(dtype)
    return q, k, v


def numpy_attention(q, k, v, *, score_fn=None, mask_fn=None, scale=None):
    """Dense attention in numpy float64, written from the definition.

    `score_fn(score, b, h, q_idx, kv_idx)` and `mask_fn(b, h, q_idx, kv_idx)` take
    numpy arrays broadcast over the (B, Hq, Lq, Lkv) grid. Returns (out, lse).
    """
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, hq, lq, d = q.shape
    hkv, lkv = k.shape[1:3]
    g = hq // hkv
    k = np.repeat(k, g, axis=1)
    v = np.repeat(v, g, axis=1)
    scale = 1 / math.sqrt(d) if scale is None else scale
    s = np.einsum("bhqd,bhkd->bhqk", q, k) * scale
    ib, ih, iq, ik = np.ix_(np.arange(b), np.arange(hq), np.arange(lq), np.arange(lkv))
    if score_fn is not None:
        s = score_fn(s, ib, ih, iq, ik)
    keep = np.ones(s.shape, bool)
    if mask_fn is not None:
        keep = np.broadcast_to(mask_fn(ib, ih, iq, ik), s.shape)
    s = np.where(keep, s, -np.inf)
    m = s.max(-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.where(keep, np.exp(s - m), 0.0)
    denom = e.sum(-1, keepdims=True)
    out = np.einsum("bhqk,bhkd->bhqd", e / np.where(denom > 0, denom, 1), v)
    with np.errstate(divide="ignore"):
        lse = np.where(denom > 0, m + np.log(denom), -np.inf)[..., 0]
    return out, lse


def to_f64(tree):
    """Casts every floating leaf of a PyTree to float64."""
    return jax.tree_util.tree_map(
        lambda x: (
            x.astype(jnp.float64)
            if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jnp.floating)
            else x
        ),
        tree,
    )


# Backends under test ---------------------------------------------------------------
#
# Tests parametrised with `backend_params()` run on every registered backend, a future
# `mosaic` or `triton` included without edits. A backend that declines a small, plain
# problem on this platform (an UnavailableBackend, a GPU kernel on a CPU machine) is
# skipped with its own reason; a kernel backend (`interpretable = True`) runs instead
# in Pallas interpret mode when no GPU is present: conftest's autouse fixture adds
# `kernel_options={name: {"interpret": True}}` to every call during that test.


def on_gpu() -> bool:
    return jax.devices()[0].platform == "gpu"


def interpret_options(name: str) -> dict:
    """The kernel options a test adds for backend `name`: interpret mode for kernel
    backends when there is no GPU, else none."""
    from eqx_flexattn._backends import BACKENDS

    if BACKENDS[name].interpretable and not on_gpu():
        return {name: {"interpret": True}}
    return {}


def decline_reason(name: str) -> str | None:
    """Why backend `name` declines a small float64 problem here, the dtype of the
    shared tests (None: it accepts)."""
    from eqx_flexattn._attention import _problem
    from eqx_flexattn._backends import BACKENDS

    q = jax.ShapeDtypeStruct((1, 2, 128, 64), jnp.float64)
    found = []

    def probe(q):
        problem = _problem(q, q, q, None, None, None, False, interpret_options(name))
        try:
            BACKENDS[name].check(problem)
        except NotImplementedError as e:
            found.append(str(e))

    jax.eval_shape(probe, q)
    return found[0] if found else None


def backend_params(*, reference: bool = True) -> list:
    """`pytest.param` per registered backend (without `reference` if asked), marked
    skip with the backend's reason where it declines on this platform."""
    import pytest

    from eqx_flexattn._backends import BACKENDS

    params = []
    for name in BACKENDS:
        if name == "reference" and not reference:
            continue
        reason = decline_reason(name)
        marks = [pytest.mark.skip(reason=f"{name}: {reason}")] if reason else []
        params.append(pytest.param(name, marks=marks, id=name))
    return params
