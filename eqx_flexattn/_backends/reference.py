"""The dense reference backend: the test oracle. O(L^2) memory, plain autodiff."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool

from .._mods import index_grid
from ._base import AbstractBackend, AttentionProblem


def element_mask(problem: AttentionProblem) -> Bool[Array, "b h lq lkv"]:
    """Which (query, key) pairs attend: full blocks, and partial blocks' mask mod."""
    b, hq, lq = problem.q.shape[:3]
    lkv = problem.k.shape[2]
    bq, bkv = problem.block_mask.block_size
    partial, full = problem.block_mask.block_states()

    def expand(x):
        x = jnp.repeat(jnp.repeat(x, bq, axis=-2), bkv, axis=-1)
        return x[..., :lq, :lkv]

    ib, ih, iq, ikv = index_grid(b, hq, lq, lkv)
    keep = expand(full) | (expand(partial) & problem.mask_mod(ib, ih, iq, ikv))
    return jnp.broadcast_to(keep, (b, hq, lq, lkv))


class ReferenceBackend(AbstractBackend):
    """Materialises every score: `softmax(where(mask, score_mod(q k^T * scale)))`."""

    name = "reference"
    differentiable = True

    def forward(self, problem: AttentionProblem) -> tuple[Array, Array]:
        q, k, v = problem.q, problem.k, problem.v
        b, hq, lq, _ = q.shape
        hkv, lkv, dv = v.shape[1:]
        g = problem.groups
        acc = problem.acc_dtype
        qg = q.astype(acc).reshape(b, hkv, g, lq, -1)
        s = jnp.einsum("bkgqd,bksd->bkgqs", qg, k.astype(acc)).reshape(b, hq, lq, lkv)
        s = s * problem.scale
        if problem.score_mod is not None:
            s = problem.score_mod(s, *index_grid(b, hq, lq, lkv))
        keep = element_mask(problem)
        m = jnp.max(jnp.where(keep, s, -jnp.inf), axis=-1, keepdims=True)
        m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
        e = jnp.where(keep, jnp.exp(jnp.where(keep, s, m) - m), 0.0)
        denom = jnp.sum(e, axis=-1, keepdims=True)
        nonempty = denom > 0
        denom_safe = jnp.where(nonempty, denom, 1.0)
        probs = (e / denom_safe).reshape(b, hkv, g, lq, lkv)
        out = jnp.einsum("bkgqs,bksd->bkgqd", probs, v.astype(acc))
        lse = jnp.where(nonempty, m + jnp.log(denom_safe), -jnp.inf)[..., 0]
        return out.reshape(b, hq, lq, dv).astype(q.dtype), lse
