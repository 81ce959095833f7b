"""Independent oracles and input generators for the tests."""

import math

import jax
import jax.numpy as jnp
import numpy as np


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
