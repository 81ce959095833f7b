"""The Pallas kernels of the `triton` backend (lowered through Triton on GPUs).

Three kernels, each one program per tile, all on scores laid out `(query rows, key
columns)`:

- forward: one program per (query tile, query head, batch) walks its key blocks,
    full ones first (mask mod skipped), then partial ones (mask mod applied), with
    the shared online softmax of `_tiles` in base 2;
- dQ: the same walk, recomputing `P` from the forward's log-sum-exp, accumulating
    `dQ` and, for score-mod tables read per program or per query row, the rows' sums
    of the tables' cotangents (partials for `_reduce.reduce_table_grads`);
- dK/dV: one program per (key tile, key/value head, batch) walks, for each query
    head of its group in turn, the query blocks of its key block (the BlockMask's
    transposed lists): GQA without copies of K and V, no atomics.

Mods are `_mods.KernelMod`s: their tables are loaded per program ("scalar"), per
row ("q"), per column ("kv") or as a Toeplitz tile ("diag", a gather of the table's
entries); the rest of the mod is elementwise code traced into the kernel.
"""

from __future__ import annotations

import functools as ft
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from ..._mods import diag_index, KernelMod
from .._tiles import (
    clamped,
    LN_2,
    LOG2_E,
    masked,
    score_gradient,
    softmax_finish,
    softmax_step,
)


class Tiles(NamedTuple):
    """The static launch of one kernel: tile sizes, warps, pipeline stages."""

    block_q: int
    block_kv: int
    num_warps: int
    num_stages: int


class Static(NamedTuple):
    """Everything static about one problem, as the kernels see it."""

    b: int
    hq: int
    hkv: int
    lq: int  # true lengths (mods see positions clamped to them)
    lkv: int
    lq_pad: int  # lengths padded to the tiles
    lkv_pad: int
    d: int  # head dims padded to powers of two
    dv: int
    scale: float
    precision: object  # of the float32 matmuls (None: inputs' own precision)
    interpret: bool
    mask_batch: bool  # the BlockMask has a batch (head) axis
    mask_head: bool

    @property
    def groups(self) -> int:
        return self.hq // self.hkv


def _dot(a, b, static: Static, *, trans_a=False, trans_b=False):
    """A matmul of two tiles, accumulated in float32."""
    precision = static.precision if a.dtype == jnp.float32 else None
    return plt.dot(a, b, trans_a=trans_a, trans_b=trans_b, precision=precision)


class _TileMod:
    """One `KernelMod` on the `(R, C)` tiles of a program: loads its tables'
    values for the tile and evaluates the mod (or its VJP) elementwise."""

    def __init__(self, mod: KernelMod | None, refs, static: Static):
        self.mod = mod
        self.refs = refs
        self.static = static

    def values(self, b, h, pos: _Pos):
        """The tables' values on the tile at `pos` (padded positions included),
        broadcast to the tile."""
        out = []
        q, kv, q0, k0 = pos
        shape = jnp.broadcast_shapes(q.shape, kv.shape)
        for spec, ref in zip(self.mod.specs, self.refs):
            bt = b if spec.batch else 0
            ht = h if spec.head else 0
            if spec.kind == "scalar":
                x = ref[bt, ht]
            elif spec.kind == "q":
                x = _along(ref[bt, ht, pl.ds(q0, q.size)], q)
            elif spec.kind == "kv":
                x = _along(ref[bt, ht, pl.ds(k0, kv.size)], kv)
            else:  # "diag": a gather of the Toeplitz tile
                x = ref[bt, ht, diag_index(q, kv, self.static.lq_pad)]
            out.append(jnp.broadcast_to(x, shape))
        return out

    def __call__(self, *args, values):
        return self.mod.apply_tile(*args, *values)


class _Pos(NamedTuple):
    """A tile's query and key positions, broadcastable to the tile: `q (R, 1)` and
    `kv (1, C)`, or `q (1, C)` and `kv (R, 1)` for a transposed tile (rows of keys);
    and the first of each."""

    q: jax.Array
    kv: jax.Array
    q0: jax.Array
    k0: jax.Array


def _positions(q0, k0, bq, bkv, transposed=False) -> _Pos:
    if transposed:
        q = q0 + lax.broadcasted_iota(jnp.int32, (1, bq), 1)
        kv = k0 + lax.broadcasted_iota(jnp.int32, (bkv, 1), 0)
    else:
        q = q0 + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
        kv = k0 + lax.broadcasted_iota(jnp.int32, (1, bkv), 1)
    return _Pos(q, kv, q0, k0)


def _along(x, like):
    """A vector `x` laid along the non-unit axis of `like` (`(R, 1)` or `(1, C)`)."""
    return x[:, None] if like.shape[1] == 1 else x[None, :]


def _index_args(b, h, pos: _Pos, static: Static, shape):
    """The (b, h, q_idx, kv_idx) a mod sees on a tile: positions past the sequence
    clamped, everything broadcast to the tile."""
    qi = jnp.broadcast_to(clamped(pos.q, static.lq), shape)
    ki = jnp.broadcast_to(clamped(pos.kv, static.lkv), shape)
    return (jnp.full(shape, b, jnp.int32), jnp.full(shape, h, jnp.int32), qi, ki)


def _keep(mask: _TileMod, b, h, pos: _Pos, static: Static, shape, apply_mask: bool):
    """Which elements of a tile attend (None: all): the mask mod on partial
    blocks, and the key padding of a ragged last key block on every block."""
    keep = None
    if apply_mask:
        idx = _index_args(b, h, pos, static, shape)
        keep = mask(*idx, values=mask.values(b, h, pos))
    if static.lkv_pad != static.lkv:
        inside = jnp.broadcast_to(pos.kv < static.lkv, shape)
        keep = inside if keep is None else keep & inside
    return keep


def _scores(q, k, score: _TileMod, b, h, pos: _Pos, static: Static):
    """Scaled, score-modded scores of a tile (float32), and the tile's values of
    the score mod's tables (for its VJP)."""
    s = _dot(q, k, static, trans_b=True) * static.scale
    values = ()
    if score.mod is not None:
        idx = _index_args(b, h, pos, static, s.shape)
        values = score.values(b, h, pos)
        s = score(s, *idx, values=values).astype(jnp.float32)
    return s, values


def _split_refs(refs, score: KernelMod | None, mask: KernelMod):
    n_score = len(score.specs) if score is not None else 0
    n_mask = len(mask.specs)
    score_refs = refs[:n_score]
    mask_refs = refs[n_score : n_score + n_mask]
    return score_refs, mask_refs, refs[n_score + n_mask :]


def _list_loops(n_full, n_all, body, carry):
    """`body(j, carry, apply_mask)` over a block list: full blocks, then partial."""
    carry = lax.fori_loop(0, n_full, ft.partial(body, apply_mask=False), carry)
    return lax.fori_loop(n_full, n_all, ft.partial(body, apply_mask=True), carry)


# --- forward -------------------------------------------------------------------------


def _forward_kernel(
    counts_ref, blocks_ref, q_ref, k_ref, v_ref, *refs, static, tiles, score, mask
):
    score_refs, mask_refs, (o_ref, lse_ref) = _split_refs(refs, score, mask)
    score_t = _TileMod(score, score_refs, static)
    mask_t = _TileMod(mask, mask_refs, static)
    bq, bkv = tiles.block_q, tiles.block_kv
    i, h, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    hk = h // static.groups
    mb = b if static.mask_batch else 0
    mh = h if static.mask_head else 0
    q0 = i * bq
    q = q_ref[b, h, pl.ds(q0, bq), :]
    n_full = counts_ref[mb, mh, i, 0]
    n_all = counts_ref[mb, mh, i, 1]

    def body(j, carry, apply_mask):
        acc, m, denom = carry
        k0 = blocks_ref[mb, mh, i, j] * bkv
        k = k_ref[b, hk, pl.ds(k0, bkv), :]
        v = v_ref[b, hk, pl.ds(k0, bkv), :]
        pos = _positions(q0, k0, bq, bkv)
        s, _ = _scores(q, k, score_t, b, h, pos, static)
        s = s * LOG2_E
        keep = _keep(mask_t, b, h, pos, static, s.shape, apply_mask)
        if keep is not None:
            s = masked(s, keep)
        m_new, alpha, p = softmax_step(m, s, jnp.exp2)
        denom = denom * alpha + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v, static)
        return acc, m_new, denom

    carry = (
        jnp.zeros((bq, static.dv), jnp.float32),
        jnp.full((bq,), -jnp.inf, jnp.float32),
        jnp.zeros((bq,), jnp.float32),
    )
    acc, m, denom = _list_loops(n_full, n_all, body, carry)
    out, lse2 = softmax_finish(acc, denom, m, jnp.log2)
    o_ref[b, h, pl.ds(q0, bq), :] = out.astype(o_ref.dtype)
    lse_ref[b, h, pl.ds(q0, bq)] = lse2 * LN_2


def _compiler_params(tiles: Tiles, static: Static):
    if static.interpret:
        return None
    return plt.CompilerParams(num_warps=tiles.num_warps, num_stages=tiles.num_stages)


def _call(kernel, grid, out_shape, static, tiles, score, mask, *args, name, **options):
    """`kernel` (with its static options) launched on `grid` over `args` (block
    lists first) and the mods' tables."""
    counts, blocks = args[:2]
    if not counts.shape[2] == blocks.shape[2] == grid[0]:  # else programs read
        # past the lists: clamped when interpreted, an illegal address on a GPU
        raise ValueError(
            f"{name}: block lists of {counts.shape[2]} rows for {grid[0]} programs."
        )
    tables = (score.tables if score is not None else ()) + mask.tables
    kernel = ft.partial(
        kernel,
        static=static,
        tiles=tiles,
        score=_static(score),
        mask=_static(mask),
        **options,
    )
    args = (*args, *tables)
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[pl.no_block_spec] * len(args),
        out_specs=[pl.no_block_spec] * len(out_shape),
        out_shape=out_shape,
        compiler_params=_compiler_params(tiles, static),
        interpret=static.interpret,
        name=name,
    )(*args)


def forward(static: Static, tiles: Tiles, q, k, v, counts, blocks, score, mask):
    """`(out (B, Hq, Lq_pad, Dv_pad), lse (B, Hq, Lq_pad))` from padded inputs and
    the forward block lists `counts (B|1, H|1, Mq, 2)` (full, all) and `blocks
    (B|1, H|1, Mq, N)` (full first), at the kernel's tiles."""
    grid = (static.lq_pad // tiles.block_q, static.hq, static.b)
    out_shape = (
        jax.ShapeDtypeStruct((static.b, static.hq, static.lq_pad, static.dv), q.dtype),
        jax.ShapeDtypeStruct((static.b, static.hq, static.lq_pad), jnp.float32),
    )
    operands = (counts, blocks, q, k, v)
    return _call(
        _forward_kernel,
        grid,
        out_shape,
        static,
        tiles,
        score,
        mask,
        *operands,
        name="flex_fwd",
    )


def _static(mod: KernelMod | None) -> KernelMod | None:
    """The mod without its tables (the kernel reads them from refs)."""
    return None if mod is None else KernelMod((), mod.split, mod.name)


# --- backward ------------------------------------------------------------------------


class _Rows(NamedTuple):
    """A query tile's operands of the backward: `q`, `dO`, the base-2 log-sum-exp
    and `delta`."""

    q: jax.Array
    do: jax.Array
    lse2: jax.Array
    delta: jax.Array


def _load_rows(refs, b, h, rows) -> _Rows:
    q_ref, do_ref, lse_ref, delta_ref = refs
    return _Rows(
        q_ref[b, h, rows, :],
        do_ref[b, h, rows, :],
        lse_ref[b, h, rows],
        delta_ref[b, h, rows],
    )


def _tile_grads(
    r: _Rows,
    k,
    v,
    score_t,
    mask_t,
    b,
    h,
    pos,
    static,
    apply_mask,
    want_values,
    transposed=False,
):
    """A tile's `P`, `dS` (before the score mod: the gradient of `q kᵀ * scale`),
    and, if `want_values`, the cotangents of the score mod's table values; all
    transposed (rows of keys) if `transposed`."""
    s_mod = lambda s, *vals: score_t(s, *idx, values=vals).astype(jnp.float32)
    q, do, lse2, delta = r
    if transposed:
        raw = _dot(k, q, static, trans_b=True) * static.scale
        per_query = lambda x: x[None, :]
    else:
        raw = _dot(q, k, static, trans_b=True) * static.scale
        per_query = lambda x: x[:, None]
    if score_t.mod is not None:
        idx = _index_args(b, h, pos, static, raw.shape)
        values = score_t.values(b, h, pos)
        s, vjp = jax.vjp(s_mod, raw, *values)
    else:
        s = raw
    keep = _keep(mask_t, b, h, pos, static, s.shape, apply_mask)
    p = jnp.exp2(s * LOG2_E - per_query(lse2))
    if keep is not None:
        p = jnp.where(keep, p, 0.0)
    if transposed:
        ds = p * (_dot(v, do, static, trans_b=True) - per_query(delta))
    else:
        ds = score_gradient(p, _dot(do, v, static, trans_b=True), delta)
    dvalues = ()
    if score_t.mod is not None:
        ds, *dvalues = vjp(ds)
        if not want_values:
            dvalues = ()
    return p, ds, dvalues


def _dq_kernel(
    counts_ref,
    blocks_ref,
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    lse_ref,
    delta_ref,
    *refs,
    static,
    tiles,
    score,
    mask,
    learnt,
    diag,
):
    score_refs, mask_refs, (dq_ref, *out_refs) = _split_refs(refs, score, mask)
    row_refs = out_refs[: len(learnt)]
    diag_refs = out_refs[len(learnt) : len(learnt) + len(diag)]
    scratch = out_refs[-1] if diag else None
    score_t = _TileMod(score, score_refs, static)
    mask_t = _TileMod(mask, mask_refs, static)
    bq, bkv = tiles.block_q, tiles.block_kv
    i, h, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    hk = h // static.groups
    mb = b if static.mask_batch else 0
    mh = h if static.mask_head else 0
    q0 = i * bq
    rows = pl.ds(q0, bq)
    r = _load_rows((q_ref, do_ref, lse_ref, delta_ref), b, h, rows)
    n_full = counts_ref[mb, mh, i, 0]
    n_all = counts_ref[mb, mh, i, 1]

    def body(j, carry, apply_mask):
        dq, sums = carry
        kb = blocks_ref[mb, mh, i, j]
        k0 = kb * bkv
        k = k_ref[b, hk, pl.ds(k0, bkv), :]
        v = v_ref[b, hk, pl.ds(k0, bkv), :]
        pos = _positions(q0, k0, bq, bkv)
        _, ds, dvalues = _tile_grads(
            r,
            k,
            v,
            score_t,
            mask_t,
            b,
            h,
            pos,
            static,
            apply_mask,
            bool(learnt or diag),
        )
        dq = dq + _dot(ds.astype(k.dtype), k, static)
        sums = tuple(acc + jnp.sum(dvalues[t], axis=1) for acc, t in zip(sums, learnt))
        for t, ref in zip(diag, diag_refs):
            ref[b, h, kb, i, :] = _diagonal_sums(dvalues[t], scratch, (b, h, i), static)
        return dq, sums

    carry = (
        jnp.zeros((bq, static.d), jnp.float32),
        tuple(jnp.zeros((bq,), jnp.float32) for _ in learnt),
    )
    dq, sums = _list_loops(n_full, n_all, body, carry)
    dq_ref[b, h, rows, :] = (dq * static.scale).astype(dq_ref.dtype)
    for ref, x in zip(row_refs, sums):
        ref[b, h, rows] = x


def _diagonal_sums(g, scratch, program, static: Static):
    """The sums of a square tile `g (n, n)` (rows of queries) along its diagonals:
    entry `x` of the `2n` sums is the diagonal `kv - q = n - x` (entry 0 is empty), as
    `_reduce.diagonal_partials` takes them. `g` goes through a scratch tile in global
    memory (`scratch[program]`, of shape `(n, n)`), read back sheared."""
    n = g.shape[0]
    scratch[(*program, slice(None), slice(None))] = g
    if not static.interpret:
        plt.debug_barrier()  # the tile is written before any thread reads it back
    r = lax.broadcasted_iota(jnp.int32, (n, 2 * n), 0)
    c = r + n - lax.broadcasted_iota(jnp.int32, (n, 2 * n), 1)
    inside = (c >= 0) & (c < n)
    sheared = jnp.where(inside, scratch[(*program, r, jnp.clip(c, 0, n - 1))], 0.0)
    if not static.interpret:
        plt.debug_barrier()  # read by every thread before the next tile overwrites it
    return jnp.sum(sheared, axis=0)


def dq(
    static,
    tiles,
    q,
    k,
    v,
    do,
    lse2,
    delta,
    counts,
    blocks,
    score,
    mask,
    learnt,
    diag=(),
):
    """`dQ (B, Hq, Lq_pad, D_pad)`; for each score-mod table `learnt[t]` (its index
    in `score.specs`), the per-query-row sums `(B, Hq, Lq_pad)` of its values'
    cotangents; for each "diag" table `diag[t]`, the diagonal sums of each 64x64 tile,
    `(B, Hq, Lkv_pad / 64, Lq_pad / 64, 128)` (see `_diagonal_sums`; tiles not
    visited hold garbage). `lse2` is the log-sum-exp in base 2, `+inf` for fully
    masked rows; `delta = rowsum(dO * O) - dlse`."""
    mq = static.lq_pad // tiles.block_q
    grid = (mq, static.hq, static.b)
    bh = (static.b, static.hq)
    rows = jax.ShapeDtypeStruct((*bh, static.lq_pad), jnp.float32)
    out_shape = (
        jax.ShapeDtypeStruct((*bh, static.lq_pad, static.d), q.dtype),
        *(rows for _ in learnt),
    )
    if diag:
        if tiles.block_q != tiles.block_kv:
            raise ValueError(f"diagonal sums need square tiles, got {tiles}.")
        n, nkv = tiles.block_q, static.lkv_pad // tiles.block_kv
        parts = jax.ShapeDtypeStruct((*bh, nkv, mq, 2 * n), jnp.float32)
        scratch = jax.ShapeDtypeStruct((*bh, mq, n, n), jnp.float32)
        out_shape = (*out_shape, *(parts for _ in diag), scratch)
    operands = (counts, blocks, q, k, v, do, lse2, delta)
    dq_, *outs = _call(
        _dq_kernel,
        grid,
        out_shape,
        static,
        tiles,
        score,
        mask,
        *operands,
        name="flex_bwd_dq",
        learnt=tuple(learnt),
        diag=tuple(diag),
    )
    sums = outs[: len(learnt)]
    return dq_, sums, outs[len(learnt) : len(learnt) + len(diag)]


def _dkv_kernel(
    counts_ref,
    blocks_ref,
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    lse_ref,
    delta_ref,
    *refs,
    static,
    tiles,
    score,
    mask,
    learnt,
):
    score_refs, mask_refs, (dk_ref, dv_ref, *col_refs) = _split_refs(refs, score, mask)
    score_t = _TileMod(score, score_refs, static)
    mask_t = _TileMod(mask, mask_refs, static)
    bq, bkv = tiles.block_q, tiles.block_kv
    n, hk, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    mb = b if static.mask_batch else 0
    k0 = n * bkv
    cols = pl.ds(k0, bkv)
    k = k_ref[b, hk, cols, :]
    v = v_ref[b, hk, cols, :]

    def head(g, carry):
        h = hk * static.groups + g
        mh = h if static.mask_head else 0

        def body(j, carry, apply_mask):
            dk, dv, sums = carry
            q0 = blocks_ref[mb, mh, n, j] * bq
            rows = pl.ds(q0, bq)
            r = _load_rows((q_ref, do_ref, lse_ref, delta_ref), b, h, rows)
            pos = _positions(q0, k0, bq, bkv, transposed=True)
            p, ds, dvalues = _tile_grads(
                r,
                k,
                v,
                score_t,
                mask_t,
                b,
                h,
                pos,
                static,
                apply_mask,
                bool(learnt),
                transposed=True,
            )
            dv = dv + _dot(p.astype(r.do.dtype), r.do, static)
            dk = dk + _dot(ds.astype(r.q.dtype), r.q, static)
            sums = tuple(
                acc + jnp.sum(dvalues[t], axis=1) for acc, t in zip(sums, learnt)
            )
            return dk, dv, sums

        n_full = counts_ref[mb, mh, n, 0]
        n_all = counts_ref[mb, mh, n, 1]
        zeros = tuple(jnp.zeros((bkv,), jnp.float32) for _ in learnt)
        dk, dv, sums = _list_loops(n_full, n_all, body, (*carry, zeros))
        for ref, x in zip(col_refs, sums):  # this query head's per-key sums
            ref[b, h, cols] = x
        return dk, dv

    carry = (
        jnp.zeros((bkv, static.d), jnp.float32),
        jnp.zeros((bkv, static.dv), jnp.float32),
    )
    dk, dv = lax.fori_loop(0, static.groups, head, carry)
    dk_ref[b, hk, cols, :] = (dk * static.scale).astype(dk_ref.dtype)
    dv_ref[b, hk, cols, :] = dv.astype(dv_ref.dtype)


def dkv(
    static, tiles, q, k, v, do, lse2, delta, counts, blocks, score, mask, learnt=()
):
    """`(dK, dV)` (padded like `k`, `v`) from the transposed block lists `counts
    (B|1, H|1, Nkv, 2)` and `blocks (B|1, H|1, Nkv, M)` (query blocks of each key
    block, full first) at the kernel's tiles; and, for each per-key score-mod table
    `learnt[t]` (its index in `score.specs`), the per-key sums `(B, Hq, Lkv_pad)` of
    its values' cotangents."""
    grid = (static.lkv_pad // tiles.block_kv, static.hkv, static.b)
    cols = jax.ShapeDtypeStruct((static.b, static.hq, static.lkv_pad), jnp.float32)
    out_shape = (
        jax.ShapeDtypeStruct(k.shape, k.dtype),
        jax.ShapeDtypeStruct(v.shape, v.dtype),
        *(cols for _ in learnt),
    )
    operands = (counts, blocks, q, k, v, do, lse2, delta)
    dk, dv, *sums = _call(
        _dkv_kernel,
        grid,
        out_shape,
        static,
        tiles,
        score,
        mask,
        *operands,
        name="flex_bwd_dkv",
        learnt=tuple(learnt),
    )
    return dk, dv, sums
