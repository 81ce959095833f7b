"""PyTorch's auxiliary outputs (`return_aux=AuxRequest(...)`) and the row maxima of
the scores, computed a query block at a time."""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ._backends._base import AttentionProblem
from ._mods import INDEX_DTYPE


class AuxRequest(NamedTuple):
    """Which auxiliary outputs `flex_attention(..., return_aux=...)` returns, as in
    PyTorch (>= 2.9): `AuxRequest(lse=True, max_scores=True)`."""

    lse: bool = False
    max_scores: bool = False


class AuxOutput(NamedTuple):
    """The auxiliary outputs of `flex_attention(..., return_aux=AuxRequest(...))`:
    each `(B, Hq, Lq)` in float32 (float64 for float64 inputs), or `None` when not
    requested.

    - `lse`: the log-sum-exp of each row's scores (natural log).
    - `max_scores`: each row's largest score after `score_mod` and masking (natural
        units, like `lse`); `-inf` for a fully masked row. Not differentiated (its
        gradient is zero).
    """

    lse: Float[Array, "b hq lq"] | None = None
    max_scores: Float[Array, "b hq lq"] | None = None


# Scores evaluated at once by `max_scores`: bounded memory at any length.
_CHUNK_ELEMENTS = 2**22


def max_scores(problem: AttentionProblem) -> Float[Array, "b hq lq"]:
    """Each query row's largest score after the score mod and the block mask.

    A `lax.map` over groups of query blocks; each step forms the scores of its rows
    against every key, so memory is bounded by `_CHUNK_ELEMENTS` (or one block of
    rows) at any length. It visits absent blocks too: an extra pass, costing about
    one dense forward matmul.
    """
    q, k = jax.lax.stop_gradient((problem.q, problem.k))
    b, hq, lq, d = q.shape
    hkv, lkv = k.shape[1:3]
    g = problem.groups
    acc = problem.acc_dtype
    bm = problem.block_mask
    bq, bkv = bm.block_size
    mq = math.ceil(lq / bq)
    per = max(1, min(mq, _CHUNK_ELEMENTS // max(1, b * hq * bq * lkv)))
    steps = math.ceil(mq / per)
    rows = per * bq
    partial, full = bm.block_states()  # (B' , H', Mq, Nkv)
    pad_q = steps * per - mq
    partial, full = (
        jnp.pad(x, [(0, 0), (0, 0), (0, pad_q), (0, 0)]) for x in (partial, full)
    )
    qp = jnp.pad(q, [(0, 0), (0, 0), (0, steps * rows - lq), (0, 0)])
    kk = k.astype(acc)

    def expand(x):  # (B', H', per, Nkv) -> (B', H', rows, Lkv)
        x = jnp.repeat(jnp.repeat(x, bq, axis=-2), bkv, axis=-1)
        return x[..., :lkv]

    def step(i):
        qi = jax.lax.dynamic_slice_in_dim(qp, i * rows, rows, axis=2).astype(acc)
        qi = qi.reshape(b, hkv, g, rows, d)
        s = jnp.einsum("bkgqd,bksd->bkgqs", qi, kk).reshape(b, hq, rows, lkv)
        s = s * problem.scale
        ib = jnp.arange(b, dtype=INDEX_DTYPE).reshape(b, 1, 1, 1)
        ih = jnp.arange(hq, dtype=INDEX_DTYPE).reshape(1, hq, 1, 1)
        iq = i * rows + jnp.arange(rows, dtype=INDEX_DTYPE).reshape(1, 1, rows, 1)
        iq = jnp.minimum(iq, lq - 1)
        ikv = jnp.arange(lkv, dtype=INDEX_DTYPE).reshape(1, 1, 1, lkv)
        if problem.score_mod is not None:
            s = problem.score_mod(s, ib, ih, iq, ikv)
        pi = jax.lax.dynamic_slice_in_dim(partial, i * per, per, axis=2)
        fi = jax.lax.dynamic_slice_in_dim(full, i * per, per, axis=2)
        keep = expand(fi) | (expand(pi) & problem.mask_mod(ib, ih, iq, ikv))
        return jnp.max(jnp.where(keep, s, -jnp.inf), axis=-1)  # (b, hq, rows)

    out = jax.lax.map(step, jnp.arange(steps))  # (steps, b, hq, rows)
    out = jnp.moveaxis(out, 0, 2).reshape(b, hq, steps * rows)[..., :lq]
    return jax.lax.stop_gradient(out.astype(acc))
