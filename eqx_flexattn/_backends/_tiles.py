"""Tile math shared by the flash-style backends.

Each function works on one tile of scores `s (..., bq, bkv)` with per-row statistics
`(..., bq)`: the `xla` backend calls them on a batch of tiles (`...` = rows), a Pallas
kernel on the single tile it holds in registers. `exp`/`log` are parameters so a
kernel can work in base 2 (`jnp.exp2`, scores pre-multiplied by `log2(e)`), as GPU
kernels do; the results then are in base 2 too.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax.numpy as jnp
from jax import lax
from jaxtyping import Array


LOG2_E = math.log2(math.e)
LN_2 = math.log(2.0)


def rowwise(x: Array, like: Array) -> Array:
    """Broadcasts per-row values `x (..., bq)` over the last axis of `like`."""
    return lax.broadcast_in_dim(x, like.shape, tuple(range(x.ndim)))


def clamped(position: Array, length: int) -> Array:
    """Positions past the sequence (tile padding) clamped to its last one: mods only
    ever see in-range indices; padded positions are masked anyway."""
    return jnp.minimum(position, length - 1)


def masked(s: Array, keep: Array) -> Array:
    """Scores with the positions that do not attend set to `-inf`."""
    return jnp.where(keep, s, -jnp.inf)


def softmax_step(
    m: Array, s: Array, exp: Callable = jnp.exp
) -> tuple[Array, Array, Array]:
    """One online-softmax step on a tile of (masked) scores.

    **Returns:** `(m_new, alpha, p)`: the new running row maximum, the factor that
    rescales the old row sums and accumulators, and the tile's unnormalised
    probabilities. Rows with no finite score so far are safe (`p = 0`, `alpha = 0`).
    """
    m_new = jnp.maximum(m, jnp.max(s, axis=-1))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    return m_new, exp(m - m_safe), exp(s - rowwise(m_safe, s))


def softmax_finish(
    acc: Array, denom: Array, m: Array, log: Callable = jnp.log
) -> tuple[Array, Array]:
    """Normalised output and log-sum-exp from the running statistics.

    Fully masked rows (`denom == 0`) give output 0 and lse `-inf`.
    """
    nonempty = denom > 0
    inv = jnp.where(nonempty, 1.0 / jnp.where(nonempty, denom, 1.0), 0.0)
    lse = jnp.where(nonempty, m + log(jnp.where(nonempty, denom, 1.0)), -jnp.inf)
    return acc * rowwise(inv, acc), lse


def probabilities(s: Array, lse: Array, keep: Array | None = None) -> Array:
    """Backward pass: `P = exp(S - lse)` recomputed from the forward's lse (rows that
    were fully masked must carry a finite stand-in lse and be zeroed by `keep`)."""
    p = jnp.exp(s - rowwise(lse, s))
    return p if keep is None else jnp.where(keep, p, 0.0)


def score_gradient(p: Array, dp: Array, delta: Array) -> Array:
    """Backward pass: `dS = P * (dP - delta)`, `delta = rowsum(dO * O)`."""
    return p * (dp - rowwise(delta, dp))
