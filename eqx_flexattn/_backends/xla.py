"""The `xla` backend: blockwise online softmax in `lax` loops, for every JAX platform.

Work is organised in *rows*: a row is one query block of one (batch, query head) with
its list of key blocks (forward, dq), or one key block with its list of query blocks
(dk, dv: the BlockMask's transposed `q_*` arrays). All rows advance together, one
batched tile per row and step, for as many steps as the longest list: a sliding window
costs its band, but a causal mask costs as much as a dense one, since the last query
block sees every key block. The kernel option `row_groups=n` sorts the rows by list
length and loops over `n` groups separately, each for its own longest list: a causal
mask then costs about `(1 + 1/n) / 2` of a dense one, at the price of `n` times as
many (smaller) steps for masks whose lists are all alike. Steps past a row's own list
compute masked tiles that are discarded. Partial blocks (mask mod applied) and full
blocks (mask mod skipped) are separate loops. Memory is O(L * block) per step: no
L x L array is ever formed.

The backward pass recomputes probabilities from the saved log-sum-exp, flash-attention
style: dq along the key lists, dk, dv and the gradients of the score mod's arrays along
the query lists. The score-mod gradients come from the score mod's VJP on each tile's
dS, summed over tiles.
"""

from __future__ import annotations

import functools as ft
from collections.abc import Callable
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from .._mods import INDEX_DTYPE
from ._base import (
    AbstractBackend,
    add_mod_grads,
    AttentionProblem,
    block_positions,
    finish_mod_grads,
    grads_like,
    score_mod_vjp,
    zero_mod_grads,
)
from ._config import AbstractConfig, check_positive_int
from ._tiles import (
    clamped,
    masked,
    probabilities,
    rowwise,
    score_gradient,
    softmax_finish,
    softmax_step,
)


# Measured on an H100 (benchmarks/results): 4 groups took causal attention at
# L=8192 from 64 to 47 ms, but dense attention from 63 to 74 ms.
DEFAULT_ROW_GROUPS = 1


class _Layout(NamedTuple):
    """Static tiling of one problem."""

    b: int
    hq: int
    hkv: int
    lq: int
    lkv: int
    bq: int  # query positions per tile
    bkv: int  # key positions per tile
    mq: int  # query blocks
    nkv: int  # key blocks
    row_groups: int


def _layout(problem: AttentionProblem) -> _Layout:
    b, hq, lq, _ = problem.q.shape
    hkv, lkv = problem.k.shape[1:3]
    bm = problem.block_mask
    mq, nkv = bm.num_blocks
    bq, bkv = bm.block_size
    # A single block covers the whole sequence: tile at its length (decoding).
    bq = bq if mq > 1 else lq
    bkv = bkv if nkv > 1 else lkv
    groups = problem.config_for(XlaBackend()).row_groups
    return _Layout(b, hq, hkv, lq, lkv, bq, bkv, mq, nkv, groups)


def _to_blocks(x: Array, n: int, size: int) -> Array:
    """(B, H, L, ...) -> (B, H, n, size, ...), zero-padding L up to n * size."""
    pad = n * size - x.shape[2]
    if pad:
        x = jnp.pad(x, [(0, 0), (0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 3))
    return x.reshape(*x.shape[:2], n, size, *x.shape[3:])


class _Rows(NamedTuple):
    """Flat rows: batch, query head and block of each, and its two block lists."""

    b: Array  # (R,)
    h: Array  # (R,)
    block: Array  # (R,)
    partial: tuple[Array, Array]  # num (R,), indices (R, N)
    full: tuple[Array, Array]


def _rows(problem: AttentionProblem, lay: _Layout, prefix: str) -> _Rows:
    """The rows of the `kv` lists (one per query block) or `q` lists (per key block)."""
    lists = problem.block_mask.block_lists(transposed={"kv": False, "q": True}[prefix])

    def flat(num, idx):
        m, n = idx.shape[-2:]
        num = jnp.broadcast_to(num, (lay.b, lay.hq, m)).reshape(-1)
        return num, jnp.broadcast_to(idx, (lay.b, lay.hq, m, n)).reshape(-1, n)

    partial, full = (flat(*x) for x in lists)
    m = partial[1].shape[0] // (lay.b * lay.hq)
    b, h, block = (
        x.reshape(-1)
        for x in jnp.meshgrid(
            jnp.arange(lay.b, dtype=INDEX_DTYPE),
            jnp.arange(lay.hq, dtype=INDEX_DTYPE),
            jnp.arange(m, dtype=INDEX_DTYPE),
            indexing="ij",
        )
    )
    return _Rows(b, h, block, partial, full)


def row_groups(lengths: Array, groups: int) -> list[Array]:
    """Row indices in `groups` batches of static sizes, longest lists first."""
    order = jnp.argsort(-lengths, stable=True)
    splits = np.array_split(np.arange(lengths.shape[0]), min(groups, lengths.shape[0]))
    return [order[s[0] : s[-1] + 1] for s in splits]


def _select(rows: _Rows, sel: Array) -> _Rows:
    return jax.tree_util.tree_map(lambda x: x[sel], rows)


class _Tile(NamedTuple):
    """Index arrays of a batch of tiles, broadcastable to (n, bq, bkv)."""

    b: Array
    h: Array
    q: Array
    kv: Array


def _tile(rows: _Rows, q_pos: Array, kv_pos: Array) -> _Tile:
    """`q_pos` (n, bq) and `kv_pos` (n, bkv): positions of each tile's elements."""
    return _Tile(
        rows.b[:, None, None], rows.h[:, None, None], q_pos[:, :, None], kv_pos[:, None]
    )


def _clamp(t: _Tile, lay: _Layout) -> tuple[Array, Array]:
    """Padded positions are masked anyway; mods only ever see in-range indices."""
    return clamped(t.q, lay.lq), clamped(t.kv, lay.lkv)


def _keep(problem, lay: _Layout, t: _Tile, valid: Array, apply_mask: bool) -> Array:
    keep = valid[:, None, None] & (t.q < lay.lq) & (t.kv < lay.lkv)
    if apply_mask:
        keep = keep & problem.mask_mod(t.b, t.h, *_clamp(t, lay))
    return keep


def _raw_scores(problem: AttentionProblem, qt: Array, kt: Array) -> Array:
    s = jnp.einsum("nqd,nkd->nqk", qt, kt, preferred_element_type=problem.acc_dtype)
    return s * problem.scale


def _scores(problem, lay, t, qt, kt) -> Array:
    """Scaled, score-modded scores of a batch of tiles (before masking)."""
    s = _raw_scores(problem, qt, kt)
    if problem.score_mod is None:
        return s
    return problem.score_mod(s, t.b, t.h, *_clamp(t, lay))


def _scores_vjp(problem, lay, t, qt, kt, want_mod_grad: bool):
    """Scores and a VJP mapping dS to (dS before the score mod, score-mod grads)."""
    s = _raw_scores(problem, qt, kt)
    if problem.score_mod is None:
        return s, lambda ds: (ds, None)
    fn = lambda s_, mod: mod(s_, t.b, t.h, *_clamp(t, lay))
    if want_mod_grad:
        return score_mod_vjp(fn, s, problem.score_mod, problem.acc_dtype)
    out, vjp = jax.vjp(lambda s_: fn(s_, problem.score_mod), s)
    return out, lambda ds: (vjp(ds)[0], None)


def _sweep(rows: _Rows, step: Callable, carry):
    """Runs `step(num, indices, apply_mask, j, carry)` for `j` in a loop over the
    partial list, then one over the full list, of a group of rows, each for the
    group's longest list."""
    for (num, idx), apply_mask in ((rows.partial, True), (rows.full, False)):
        body = ft.partial(step, num, idx, apply_mask)
        carry = jax.lax.fori_loop(0, jnp.max(num), body, carry)
    return carry


def _by_groups(rows: _Rows, lay: _Layout, fn: Callable, outputs: tuple, extra=None):
    """Calls `fn(group_rows, extra) -> (row_outputs, extra)` on each group of rows and
    scatters the row outputs into `outputs` (arrays with a leading row axis)."""
    lengths = rows.partial[0] + rows.full[0]
    for sel in row_groups(lengths, lay.row_groups):
        group_out, extra = fn(_select(rows, sel), extra)
        outputs = tuple(o.at[sel].set(g) for o, g in zip(outputs, group_out))
    return outputs, extra


def _forward(problem: AttentionProblem) -> tuple[Array, Array]:
    lay = _layout(problem)
    acc = problem.acc_dtype
    g = problem.groups
    qb = _to_blocks(problem.q, lay.mq, lay.bq)  # B Hq Mq bq D
    kb = _to_blocks(problem.k, lay.nkv, lay.bkv)  # B Hkv Nkv bkv D
    vb = _to_blocks(problem.v, lay.nkv, lay.bkv)
    dv = vb.shape[-1]

    def group(rows: _Rows, extra):
        n = rows.b.shape[0]
        qt = qb[rows.b, rows.h, rows.block]
        q_pos = block_positions(rows.block, lay.bq)
        init = (
            jnp.full((n, lay.bq), -jnp.inf, acc),
            jnp.zeros((n, lay.bq), acc),
            jnp.zeros((n, lay.bq, dv), acc),
        )

        def step(num, idx, apply_mask, j, carry):
            m, denom, o = carry
            blk = idx[:, j]
            t = _tile(rows, q_pos, block_positions(blk, lay.bkv))
            kt = kb[rows.b, rows.h // g, blk]
            vt = vb[rows.b, rows.h // g, blk]
            s = _scores(problem, lay, t, qt, kt)
            s = masked(s, _keep(problem, lay, t, j < num, apply_mask))
            m_new, alpha, p = softmax_step(m, s)
            pv = jnp.einsum(
                "nqk,nkd->nqd", p.astype(vt.dtype), vt, preferred_element_type=acc
            )
            denom = alpha * denom + jnp.sum(p, axis=-1)
            return m_new, denom, rowwise(alpha, o) * o + pv

        m, denom, o = _sweep(rows, step, init)
        return softmax_finish(o, denom, m), extra

    rows = _rows(problem, lay, "kv")
    r = rows.b.shape[0]
    outputs = (jnp.zeros((r, lay.bq, dv), acc), jnp.zeros((r, lay.bq), acc))
    (out, lse), _ = _by_groups(rows, lay, group, outputs)
    out = out.reshape(lay.b, lay.hq, -1, dv)[:, :, : lay.lq]
    lse = lse.reshape(lay.b, lay.hq, -1)[:, :, : lay.lq]
    return out.astype(problem.q.dtype), lse


# Backward pass -------------------------------------------------------------------
#
# A prologue (`_backward_inputs`) computes what both passes read: delta, the safe
# lse and the inputs cut into blocks. The dq pass walks each query block's key list;
# the dk/dv pass walks each key block's query list and also reduces the score mod's
# parameter gradients. Both call `_tile_backward` on each batch of tiles. A pass is a
# `group` function (one group of rows, see `_by_groups`) and a `step` function (one
# tile per row, see `_sweep`), with the per-group operands bound by `ft.partial`.


class _BackwardInputs(NamedTuple):
    """What both backward passes read, cut into blocks (`_to_blocks`)."""

    q: Array  # (B, Hq, Mq, bq, D)
    dout: Array  # (B, Hq, Mq, bq, Dv)
    lse: Array  # (B, Hq, Mq, bq): the forward's lse, 0 on fully masked rows
    delta: Array  # (B, Hq, Mq, bq): rowsum(dO * O), minus dlse where lse is finite
    k: Array  # (B, Hkv, Nkv, bkv, D)
    v: Array  # (B, Hkv, Nkv, bkv, Dv)


def _backward_inputs(
    problem: AttentionProblem,
    lay: _Layout,
    out: Array,
    lse: Array,
    dout: Array,
    dlse: Array | None,
) -> _BackwardInputs:
    """The backward pass's prologue: `delta = rowsum(dO * O) - dlse` in the
    accumulator dtype and the lse with fully masked rows set to 0 (their
    probabilities are zeroed by the mask anyway), in blocks with q, dO, k and v."""
    acc = problem.acc_dtype
    nonempty = jnp.isfinite(lse)
    delta = jnp.sum(dout.astype(acc) * out.astype(acc), axis=-1)
    if dlse is not None:
        # The lse of a fully masked row is a constant -inf: no gradient flows back.
        delta = delta - jnp.where(nonempty, dlse.astype(acc), 0.0)
    lse_safe = jnp.where(nonempty, lse, 0.0)
    return _BackwardInputs(
        q=_to_blocks(problem.q, lay.mq, lay.bq),
        dout=_to_blocks(dout, lay.mq, lay.bq),
        lse=_to_blocks(lse_safe, lay.mq, lay.bq),
        delta=_to_blocks(delta, lay.mq, lay.bq),
        k=_to_blocks(problem.k, lay.nkv, lay.bkv),
        v=_to_blocks(problem.v, lay.nkv, lay.bkv),
    )


class _QSide(NamedTuple):
    """The query-side operands of a batch of tiles: one query block per row."""

    q: Array  # (n, bq, D)
    dout: Array  # (n, bq, Dv)
    lse: Array  # (n, bq)
    delta: Array  # (n, bq)


def _q_side(x: _BackwardInputs, b: Array, h: Array, block: Array) -> _QSide:
    idx = (b, h, block)
    return _QSide(x.q[idx], x.dout[idx], x.lse[idx], x.delta[idx])


def _tile_backward(problem, lay, t: _Tile, qs: _QSide, kt, vt, keep, want_mod_grad):
    """One batch of tiles: `P`, the score gradient before the score mod (`dS` mapped
    through the mod's VJP) and the tiles' score-mod parameter gradients (None unless
    `want_mod_grad`)."""
    s, vjp = _scores_vjp(problem, lay, t, qs.q, kt, want_mod_grad)
    p = probabilities(s, qs.lse, keep)
    dp = jnp.einsum(
        "nqd,nkd->nqk", qs.dout, vt, preferred_element_type=problem.acc_dtype
    )
    ds = jnp.where(keep, score_gradient(p, dp, qs.delta), 0.0)
    ds_raw, dmod = vjp(ds)
    return p, ds_raw, dmod


def _dq_step(problem, lay, x, rows, q_pos, qs, num, idx, apply_mask, j, dq):
    """dq += dS K over the `j`-th key block of each row's list."""
    g = problem.groups
    blk = idx[:, j]
    t = _tile(rows, q_pos, block_positions(blk, lay.bkv))
    kt = x.k[rows.b, rows.h // g, blk]
    vt = x.v[rows.b, rows.h // g, blk]
    keep = _keep(problem, lay, t, j < num, apply_mask)
    _, ds, _ = _tile_backward(problem, lay, t, qs, kt, vt, keep, False)
    acc = problem.acc_dtype
    return dq + jnp.einsum(
        "nqk,nkd->nqd", ds.astype(kt.dtype), kt, preferred_element_type=acc
    )


def _dq_group(problem, lay, x, rows: _Rows, extra):
    """dq (unscaled, accumulator dtype) of one group of query-block rows."""
    qs = _q_side(x, rows.b, rows.h, rows.block)
    q_pos = block_positions(rows.block, lay.bq)
    step = ft.partial(_dq_step, problem, lay, x, rows, q_pos, qs)
    return (_sweep(rows, step, jnp.zeros(qs.q.shape, problem.acc_dtype)),), extra


def _dq_pass(problem: AttentionProblem, lay: _Layout, x: _BackwardInputs) -> Array:
    """The dq pass: along each query block's key lists. Returns dq like q."""
    q = problem.q
    rows = _rows(problem, lay, "kv")
    init = (jnp.zeros((rows.b.shape[0], lay.bq, q.shape[-1]), problem.acc_dtype),)
    group = ft.partial(_dq_group, problem, lay, x)
    (dq,), _ = _by_groups(rows, lay, group, init)
    dq = (dq * problem.scale).reshape(lay.b, lay.hq, -1, q.shape[-1])
    return dq[:, :, : lay.lq].astype(q.dtype)


def _dkv_step(
    problem, lay, x, rows, kv_pos, kt, vt, need_dmod, num, idx, apply_mask, j, carry
):
    """dk += dSᵀ Q, dv += Pᵀ dO and the score-mod gradients over the `j`-th query
    block of each row's list."""
    acc = problem.acc_dtype
    dk, dv, dmod = carry
    blk = idx[:, j]
    t = _tile(rows, block_positions(blk, lay.bq), kv_pos)
    qs = _q_side(x, rows.b, rows.h, blk)
    keep = _keep(problem, lay, t, j < num, apply_mask)
    p, ds, dmod_j = _tile_backward(problem, lay, t, qs, kt, vt, keep, need_dmod)
    dv = dv + jnp.einsum(
        "nqk,nqd->nkd", p.astype(qs.dout.dtype), qs.dout, preferred_element_type=acc
    )
    dk = dk + jnp.einsum(
        "nqk,nqd->nkd", ds.astype(qs.q.dtype), qs.q, preferred_element_type=acc
    )
    if need_dmod:
        dmod = add_mod_grads(dmod, dmod_j)
    return dk, dv, dmod


def _dkv_group(problem, lay, x, need_dmod, rows: _Rows, dmod):
    """dk, dv (unscaled, per query head, accumulator dtype) of one group of key-block
    rows; adds the group's score-mod gradients to the running `dmod`."""
    acc = problem.acc_dtype
    g = problem.groups
    kt = x.k[rows.b, rows.h // g, rows.block]
    vt = x.v[rows.b, rows.h // g, rows.block]
    kv_pos = block_positions(rows.block, lay.bkv)
    step = ft.partial(_dkv_step, problem, lay, x, rows, kv_pos, kt, vt, need_dmod)
    init = (jnp.zeros(kt.shape, acc), jnp.zeros(vt.shape, acc), dmod)
    dk, dv, dmod = _sweep(rows, step, init)
    return (dk, dv), dmod


def _dkv_pass(problem: AttentionProblem, lay: _Layout, x: _BackwardInputs, need_dmod):
    """The dk/dv pass: along each key block's query lists (the transposed lists).
    Returns dk, dv like k, v, and the score mod's parameter gradients (None unless
    `need_dmod`), each in its parameter's dtype."""
    acc = problem.acc_dtype
    g = problem.groups
    k, v = problem.k, problem.v
    dmod0 = None
    if need_dmod:
        dmod0 = zero_mod_grads(problem.score_mod, acc)
    rows = _rows(problem, lay, "q")
    r = rows.b.shape[0]
    init = (
        jnp.zeros((r, lay.bkv, k.shape[-1]), acc),
        jnp.zeros((r, lay.bkv, v.shape[-1]), acc),
    )
    group = ft.partial(_dkv_group, problem, lay, x, need_dmod)
    (dk, dv), dmod = _by_groups(rows, lay, group, init, dmod0)
    if need_dmod:
        dmod = finish_mod_grads(dmod, problem.score_mod)

    def finish(y, like):
        # Sum over the query heads that share a key/value head.
        y = y.reshape(lay.b, lay.hkv, g, -1, y.shape[-1]).sum(axis=2)
        return y[:, :, : lay.lkv].astype(like.dtype)

    return finish(dk * problem.scale, k), finish(dv, v), dmod


def _backward(problem, out, lse, dout, dlse, need_dq, need_dkv, need_dmod):
    """dq, dk, dv and the score mod's parameter gradients (None where not needed)."""
    lay = _layout(problem)
    x = _backward_inputs(problem, lay, out, lse, dout, dlse)
    dq = _dq_pass(problem, lay, x) if need_dq else None
    dk = dv = dmod = None
    if need_dkv or need_dmod:
        dk, dv, dmod = _dkv_pass(problem, lay, x, need_dmod)
    return dq, dk, dv, dmod


class XlaConfig(AbstractConfig):
    """Options of the `xla` backend.

    - `row_groups`: how many batches of rows, grouped by list length, are looped
        over separately (default 1: one loop over every row, for the longest list;
        4 speeds up causal masks on long sequences).

    The xla backend tiles at the BlockMask's block size, so PyTorch's `BLOCK_M`,
    `BLOCK_N`, `num_warps` and `num_stages` have no equivalent here.
    """

    row_groups: int = eqx.field(static=True, default=DEFAULT_ROW_GROUPS)

    def __check_init__(self):
        check_positive_int("xla", "row_groups", self.row_groups)


class XlaBackend(AbstractBackend):
    """Blockwise flash attention in `lax` loops; any JAX platform.

    Options: [`XlaConfig`][] (`kernel_options={"row_groups": n}` or
    `kernel_options={"xla": {"row_groups": n}}`).
    """

    name = "xla"
    config_class = XlaConfig

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
