"""The `xla` backend: blockwise online softmax in `lax` loops, for every JAX platform.

Query blocks are processed side by side (one batched matmul per step); the loop runs
over positions in each query block's list of key blocks, so the trip count is the
longest list, not the number of key blocks, and absent blocks are never loaded. Partial
blocks (mask mod applied) and full blocks (mask mod skipped) are two loops. Memory is
O(L * block_kv) per step: no L x L array is ever formed.

The backward pass recomputes probabilities from the saved log-sum-exp, flash-attention
style: one sweep along the key lists of every query block for dq, one along the query
lists of every key block (the BlockMask's transposed `q_*` arrays) for dk, dv and the
gradients of the score mod's arrays, which come from the score mod's VJP on each
block's dS, summed over blocks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array

from .._mods import INDEX_DTYPE
from ._base import AbstractBackend, AttentionProblem, block_positions, grads_like


class _Layout(NamedTuple):
    """Static tiling of one problem. Grouped layout: (B, Hkv, G, blocks, rows, ...)."""

    b: int
    hkv: int
    g: int
    lq: int
    lkv: int
    bq: int  # query rows per tile
    bkv: int  # key rows per tile
    mq: int  # query blocks
    nkv: int  # key blocks
    per_head_mask: bool  # the BlockMask has one pattern per query head


def _layout(problem: AttentionProblem) -> _Layout:
    b, hq, lq, _ = problem.q.shape
    hkv, lkv = problem.k.shape[1:3]
    bm = problem.block_mask
    mq, nkv = bm.num_blocks
    bq, bkv = bm.block_size
    # A single block covers the whole sequence: tile at its length (decoding).
    bq = bq if mq > 1 else lq
    bkv = bkv if nkv > 1 else lkv
    per_head = bm.kv_num_blocks.shape[1] > 1
    return _Layout(b, hkv, hq // hkv, lq, lkv, bq, bkv, mq, nkv, per_head)


def _to_blocks(x: Array, n: int, size: int) -> Array:
    """(B, H, L, ...) -> (B, H, n, size, ...), zero-padding L up to n * size."""
    pad = n * size - x.shape[2]
    if pad:
        x = jnp.pad(x, [(0, 0), (0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 3))
    return x.reshape(*x.shape[:2], n, size, *x.shape[3:])


def _group(x: Array, lay: _Layout) -> Array:
    """(B, Hq, ...) -> (B, Hkv, G, ...)."""
    return x.reshape(x.shape[0], lay.hkv, lay.g, *x.shape[2:])


def _ungroup(x: Array) -> Array:
    return x.reshape(x.shape[0], -1, *x.shape[3:])


def _mask_lists(problem: AttentionProblem, lay: _Layout, name: str):
    """`(num, indices)` of one block list, shaped (B|1, Hkv|1, G|1, rows[, cols])."""
    num = getattr(problem.block_mask, f"{name}_num_blocks")
    idx = getattr(problem.block_mask, f"{name}_indices")

    def shape(x):
        if lay.per_head_mask:
            return _group(x, lay)
        return x[:, :, None]

    return shape(num), shape(idx)


def _take(x: Array, idx: Array, grouped: bool) -> Array:
    """Selects blocks: x (B, Hkv[, G], n, ...) at idx (B|1, Hkv|1, G|1, m)."""
    b, hkv = x.shape[:2]
    ib = jnp.arange(b).reshape(b, 1, 1, 1)
    ik = jnp.arange(hkv).reshape(1, hkv, 1, 1)
    if grouped:
        g = x.shape[2]
        return x[ib, ik, jnp.arange(g).reshape(1, 1, g, 1), idx]
    return x[ib, ik, idx]


class _Tile(NamedTuple):
    """Index arrays of a batch of tiles, broadcastable to (B, Hkv, G, m, rows, cols)."""

    b: Array
    h: Array
    q: Array
    kv: Array


def _tile_indices(lay: _Layout, q_pos: Array, kv_pos: Array) -> _Tile:
    b = jnp.arange(lay.b, dtype=INDEX_DTYPE).reshape(lay.b, 1, 1, 1, 1, 1)
    h = jnp.arange(lay.hkv * lay.g, dtype=INDEX_DTYPE).reshape(
        1, lay.hkv, lay.g, 1, 1, 1
    )
    return _Tile(b, h, q_pos[..., :, None], kv_pos[..., None, :])


def _keep(
    problem: AttentionProblem, lay: _Layout, t: _Tile, valid: Array, apply_mask: bool
) -> Array:
    keep = valid[..., None, None] & (t.q < lay.lq) & (t.kv < lay.lkv)
    if apply_mask:
        keep = keep & problem.mask_mod(t.b, t.h, *_clamp(t, lay))
    return keep


def _clamp(t: _Tile, lay: _Layout) -> tuple[Array, Array]:
    """Padded positions are masked anyway; mods only ever see in-range indices."""
    return jnp.minimum(t.q, lay.lq - 1), jnp.minimum(t.kv, lay.lkv - 1)


def _raw_scores(problem: AttentionProblem, qt: Array, kt: Array) -> Array:
    s = jnp.einsum(
        "...qd,...kd->...qk", qt, kt, preferred_element_type=problem.acc_dtype
    )
    return s * problem.scale


def _modded(lay: _Layout, t: _Tile, s: Array, score_mod) -> Array:
    return score_mod(s, t.b, t.h, *_clamp(t, lay))


def _scores(problem, lay, t, qt, kt):
    """Scaled, score-modded scores of a batch of tiles (before masking)."""
    s = _raw_scores(problem, qt, kt)
    if problem.score_mod is None:
        return s
    return _modded(lay, t, s, problem.score_mod)


def _scores_vjp(problem, lay, t, qt, kt, want_mod_grad: bool):
    """Scores and a VJP mapping dS to (dS before the score mod, score-mod grads)."""
    s = _raw_scores(problem, qt, kt)
    if problem.score_mod is None:
        return s, lambda ds: (ds, None)
    fn = lambda s_, mod: _modded(lay, t, s_, mod)
    if want_mod_grad:
        return eqx.filter_vjp(fn, s, problem.score_mod)
    out, vjp = jax.vjp(lambda s_: fn(s_, problem.score_mod), s)
    return out, lambda ds: (vjp(ds)[0], None)


def _loop(n: Array, body: Callable, carry):
    return jax.lax.fori_loop(0, n, body, carry)


def _for_each_list(problem, lay, prefix: str, body_for: Callable, carry):
    """Runs `body_for(apply_mask)` over the partial, then the full, block lists."""
    for kind, apply_mask in ((prefix, True), (f"full_{prefix}", False)):
        num, idx = _mask_lists(problem, lay, kind)
        carry = _loop(jnp.max(num), body_for(num, idx, apply_mask), carry)
    return carry


def _forward(problem: AttentionProblem) -> tuple[Array, Array]:
    lay = _layout(problem)
    acc = problem.acc_dtype
    qb = _group(_to_blocks(problem.q, lay.mq, lay.bq), lay)  # B K G Mq bq D
    kb = _to_blocks(problem.k, lay.nkv, lay.bkv)  # B K Nkv bkv D
    vb = _to_blocks(problem.v, lay.nkv, lay.bkv)
    q_pos = block_positions(jnp.arange(lay.mq), lay.bq)[None, None, None]
    rows = qb.shape[:-1]
    init = (
        jnp.full(rows, -jnp.inf, acc),
        jnp.zeros(rows, acc),
        jnp.zeros((*rows, vb.shape[-1]), acc),
    )

    def body_for(num, idx, apply_mask):
        def body(j, carry):
            m, denom, o = carry
            blk = idx[..., j]
            t = _tile_indices(lay, q_pos, block_positions(blk, lay.bkv))
            s = _scores(problem, lay, t, qb, _take(kb, blk, False))
            keep = _keep(problem, lay, t, j < num, apply_mask)
            s = jnp.where(keep, s, -jnp.inf)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
            alpha = jnp.exp(m - m_safe)
            p = jnp.exp(s - m_safe[..., None])
            vt = _take(vb, blk, False)
            pv = jnp.einsum(
                "...qk,...kd->...qd", p.astype(vt.dtype), vt, preferred_element_type=acc
            )
            return m_new, alpha * denom + jnp.sum(p, axis=-1), alpha[..., None] * o + pv

        return body

    m, denom, o = _for_each_list(problem, lay, "kv", body_for, init)
    nonempty = denom > 0
    denom_safe = jnp.where(nonempty, denom, 1.0)
    out = o / denom_safe[..., None]
    lse = jnp.where(nonempty, m + jnp.log(denom_safe), -jnp.inf)
    b, hq, lq, _ = problem.q.shape
    out = _ungroup(out).reshape(b, hq, -1, out.shape[-1])[:, :, :lq]
    lse = _ungroup(lse).reshape(b, hq, -1)[:, :, :lq]
    return out.astype(problem.q.dtype), lse


def _backward(problem, out, lse, dout, dlse, need_dq, need_dkv, need_dmod):
    lay = _layout(problem)
    acc = problem.acc_dtype
    q, k, v = problem.q, problem.k, problem.v
    nonempty = jnp.isfinite(lse)
    delta = jnp.sum(dout.astype(acc) * out.astype(acc), axis=-1)
    if dlse is not None:
        # The lse of a fully masked row is a constant -inf: no gradient flows back.
        delta = delta - jnp.where(nonempty, dlse.astype(acc), 0.0)
    lse_safe = jnp.where(nonempty, lse, 0.0)
    qb = _group(_to_blocks(q, lay.mq, lay.bq), lay)
    dob = _group(_to_blocks(dout, lay.mq, lay.bq), lay)
    lseb = _group(_to_blocks(lse_safe, lay.mq, lay.bq), lay)
    deltab = _group(_to_blocks(delta, lay.mq, lay.bq), lay)
    kb = _to_blocks(k, lay.nkv, lay.bkv)
    vb = _to_blocks(v, lay.nkv, lay.bkv)

    def probs_and_ds(t, qt, kt, vt, dot, lset, deltat, keep, want_mod_grad):
        s, vjp = _scores_vjp(problem, lay, t, qt, kt, want_mod_grad)
        p = jnp.where(keep, jnp.exp(s - lset[..., None]), 0.0)
        dp = jnp.einsum("...qd,...kd->...qk", dot, vt, preferred_element_type=acc)
        ds = jnp.where(keep, p * (dp - deltat[..., None]), 0.0)
        ds_raw, dmod = vjp(ds)
        return p, ds_raw, dmod

    dq = None
    if need_dq:
        q_pos = block_positions(jnp.arange(lay.mq), lay.bq)[None, None, None]

        def dq_body_for(num, idx, apply_mask):
            def body(j, dq):
                blk = idx[..., j]
                t = _tile_indices(lay, q_pos, block_positions(blk, lay.bkv))
                kt, vt = _take(kb, blk, False), _take(vb, blk, False)
                keep = _keep(problem, lay, t, j < num, apply_mask)
                _, ds, _ = probs_and_ds(t, qb, kt, vt, dob, lseb, deltab, keep, False)
                return dq + jnp.einsum(
                    "...qk,...kd->...qd",
                    ds.astype(kt.dtype),
                    kt,
                    preferred_element_type=acc,
                )

            return body

        dq = _for_each_list(problem, lay, "kv", dq_body_for, jnp.zeros(qb.shape, acc))
        dq = _ungroup(dq * problem.scale).reshape(q.shape[:2] + (-1, q.shape[-1]))
        dq = dq[:, :, : lay.lq].astype(q.dtype)

    dk = dv = dmod = None
    if need_dkv or need_dmod:
        kv_pos = block_positions(jnp.arange(lay.nkv), lay.bkv)[None, None, None]
        dmod0 = None
        if need_dmod:
            dmod0 = jax.tree_util.tree_map(
                jnp.zeros_like, eqx.filter(problem.score_mod, eqx.is_inexact_array)
            )
        shape_kv = (lay.b, lay.hkv, lay.g, lay.nkv, lay.bkv)
        init = (
            jnp.zeros((*shape_kv, k.shape[-1]), acc),
            jnp.zeros((*shape_kv, v.shape[-1]), acc),
            dmod0,
        )
        kbg, vbg = kb[:, :, None], vb[:, :, None]

        def dkv_body_for(num, idx, apply_mask):
            def body(j, carry):
                dk, dv, dmod = carry
                blk = idx[..., j]
                t = _tile_indices(lay, block_positions(blk, lay.bq), kv_pos)
                qt, dot = _take(qb, blk, True), _take(dob, blk, True)
                lset, deltat = _take(lseb, blk, True), _take(deltab, blk, True)
                keep = _keep(problem, lay, t, j < num, apply_mask)
                p, ds, dmod_j = probs_and_ds(
                    t, qt, kbg, vbg, dot, lset, deltat, keep, need_dmod
                )
                dv = dv + jnp.einsum(
                    "...qk,...qd->...kd",
                    p.astype(dot.dtype),
                    dot,
                    preferred_element_type=acc,
                )
                dk = dk + jnp.einsum(
                    "...qk,...qd->...kd",
                    ds.astype(qt.dtype),
                    qt,
                    preferred_element_type=acc,
                )
                if need_dmod:
                    dmod = jax.tree_util.tree_map(jnp.add, dmod, dmod_j)
                return dk, dv, dmod

            return body

        dk, dv, dmod = _for_each_list(problem, lay, "q", dkv_body_for, init)

        def finish(x, like):
            x = jnp.sum(x, axis=2)  # sum over the query heads sharing a kv head
            x = x.reshape(lay.b, lay.hkv, -1, x.shape[-1])[:, :, : lay.lkv]
            return x.astype(like.dtype)

        dk = finish(dk * problem.scale, k)
        dv = finish(dv, v)
    return dq, dk, dv, dmod


class XlaBackend(AbstractBackend):
    """Blockwise flash attention in `lax` loops; any JAX platform."""

    name = "xla"

    def forward(self, problem: AttentionProblem) -> tuple[Array, Array]:
        return _forward(problem)

    def backward(self, problem, out, lse, dout, dlse, perturbed):
        if dout is None:
            dout = jnp.zeros_like(out)
        need_mod = perturbed.score_mod is not None and any(
            jax.tree_util.tree_leaves(perturbed.score_mod)
        )
        dq, dk, dv, dmod = _backward(
            problem,
            out,
            lse,
            dout,
            dlse,
            need_dq=perturbed.q,
            need_dkv=perturbed.k or perturbed.v,
            need_dmod=need_mod,
        )
        return grads_like(problem, dq, dk, dv, dmod)
