"""The Pallas Mosaic GPU backward kernels (Hopper): block-sparse dQ and dK/dV.

Both recompute `P = exp2(S·log2(e) − lse₂)` from the forward's lse (base 2; `+inf`
for fully masked rows, so their `P` is 0) and `dS = P ⊙ (dP − delta)` with
`delta = rowsum(dO ⊙ O)` precomputed. Like the forward, a program runs two consumer
warpgroups of 64 rows and a producer warpgroup that streams tiles by TMA through a
`num_stages`-deep shared-memory ring, in the order of a block list: full blocks
first, then partial ones (mask mod applied).

- dQ: one program per (query head, 128-row query block, batch), streaming the K/V
  tiles of the block's key list; `dQ += dS K`. It also returns, per query row, the
  row sums of the score mod's VJP on every float table of kind "scalar" or "q"
  (`_mods.KernelMod`): the parameter gradients, reduced afterwards (no atomics).
- dK/dV: one program per (key/value head, 128-key block, batch), streaming the Q/dO
  tiles (64 rows) of the block's transposed lists for every query head of the group
  (GQA is summed in registers); it works on `Sᵀ` (rows are keys):
  `dV += Pᵀ dO`, `dK += dSᵀ Q`. For every float table of kind "diag" (relative
  positions) it also returns the sums of the score mod's VJP along the diagonals of
  each 64x64 tile (`_mod_tiles.diagonal_sums`), placed on the table afterwards
  (`_reduce.diagonal_partials`; no atomics).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from ..._mods import KernelMod
from .._tiles import LOG2_E, rowwise
from ._mod_tiles import apply_keep, diagonal_sums, DIAGONALS, KernelMods, SHEAR_WIDTH
from ._pipeline import (
    check_smem,
    COL,
    CONSUMERS,
    drain,
    Handoff,
    mma_group,
    NamedBarriers,
    produce,
    produce_kv,
    ROW,
    run_scoped_warpgroups,
    smem_bytes,
    split_warpgroups,
    sweep,
    swizzled,
    warp_specialized,
    WG,
    WGMMA_ROWS,
)


@dataclasses.dataclass(frozen=True)
class BackwardShape:
    b: int
    hq: int
    hkv: int
    lq: int
    lkv: int
    lq_pad: int
    lkv_pad: int
    d: int
    dv: int
    block_kv: int  # key tile of the dQ kernel
    num_stages: int
    scale: float
    interpret: bool

    @property
    def groups(self) -> int:
        return self.hq // self.hkv


ROWS = WGMMA_ROWS  # rows per consumer warpgroup: queries (dQ) or keys (dK/dV)
PROGRAM_ROWS = CONSUMERS * ROWS  # rows per program
DKV_TILES = (ROWS, PROGRAM_ROWS)  # the dK/dV kernel's (query tile, key block)
DQ_TABLE_KINDS = ("scalar", "q")  # float tables whose gradients the dQ kernel sums
DKV_TABLE_KINDS = ("diag",)  # ... and the dK/dV kernel


def grad_tables(specs, want: bool, kinds) -> list[int]:
    """Indices of the float tables of `kinds` (among a score mod's table `specs`,
    None: no score mod) whose gradient a kernel produces."""
    if specs is None or not want:
        return []
    return [
        i
        for i, sp in enumerate(specs)
        if sp.kind in kinds and jnp.issubdtype(sp.dtype, jnp.floating)
    ]


def _dq_scratch(s: BackwardShape, dtype, n_grads: int) -> tuple[dict, dict]:
    """The dQ kernel's shared-memory buffers and TMA barriers, by name."""
    bkv, stages = s.block_kv, s.num_stages
    smem = {
        "q": plgpu.SMEM((CONSUMERS, ROWS, s.d), dtype, transforms=swizzled()),
        "do": plgpu.SMEM((CONSUMERS, ROWS, s.dv), dtype, transforms=swizzled()),
        "k": plgpu.SMEM((stages, bkv, s.d), dtype, transforms=swizzled()),
        "v": plgpu.SMEM((stages, bkv, s.dv), dtype, transforms=swizzled()),
        # Each warpgroup's row sums of table gradients, on their way out.
        "row_sums": plgpu.SMEM((CONSUMERS, max(n_grads, 1), ROWS), jnp.float32),
        # dS staged for its wgmma, in interpret mode only.
        "ds": plgpu.SMEM((CONSUMERS, ROWS, bkv), dtype, transforms=swizzled())
        if s.interpret
        else None,
    }
    barriers = {
        "k": plgpu.Barrier(num_barriers=stages),
        "v": plgpu.Barrier(num_barriers=stages),
        "q_do": plgpu.Barrier(num_barriers=2 * CONSUMERS),  # Q, dO per warpgroup
    }
    return smem, barriers


def _dkv_scratch(s: BackwardShape, dtype, diagonals: bool) -> tuple[dict, dict]:
    """The dK/dV kernel's shared-memory buffers and TMA barriers, by name
    (`diagonals`: it sums "diag" table gradients)."""
    stages = s.num_stages
    smem = {
        "k": plgpu.SMEM((CONSUMERS, ROWS, s.d), dtype, transforms=swizzled()),
        "v": plgpu.SMEM((CONSUMERS, ROWS, s.dv), dtype, transforms=swizzled()),
        "q": plgpu.SMEM((stages, ROWS, s.d), dtype, transforms=swizzled()),
        "do": plgpu.SMEM((stages, ROWS, s.dv), dtype, transforms=swizzled()),
        "lse": plgpu.SMEM((stages, ROWS), jnp.float32),
        "delta": plgpu.SMEM((stages, ROWS), jnp.float32),
        # Pᵀ and dSᵀ staged for their wgmmas, in interpret mode only.
        "p_ds": plgpu.SMEM((CONSUMERS, 2, ROWS, ROWS), dtype, transforms=swizzled())
        if s.interpret
        else None,
        "shear": plgpu.SMEM((CONSUMERS, ROWS, SHEAR_WIDTH), jnp.float32)
        if diagonals
        else None,
    }
    barriers = {
        **{n: plgpu.Barrier(num_barriers=stages) for n in ("q", "do", "lse", "delta")},
        "k_v": plgpu.Barrier(num_barriers=2 * CONSUMERS),  # K, V per warpgroup
    }
    return smem, barriers


def smem_needed(s: BackwardShape, dtype, specs, want_tables: bool) -> dict:
    """Bytes of shared memory the dQ and dK/dV kernels take on the GPU, by kernel
    (`specs`: the score mod's table specs, or None; `want_tables`: its table
    gradients are wanted)."""
    gpu = dataclasses.replace(s, interpret=False)
    n_grads = len(grad_tables(specs, want_tables, DQ_TABLE_KINDS))
    diagonals = bool(grad_tables(specs, want_tables, DKV_TABLE_KINDS))
    return {
        # The dQ kernel reduces (over keys) only for the table gradients' row sums.
        "dQ": smem_bytes(*_dq_scratch(gpu, dtype, n_grads), n_grads > 0),
        "dK/dV": smem_bytes(*_dkv_scratch(gpu, dtype, diagonals), False),
    }


def check_fits(s: BackwardShape, dtype, specs, want_tables: bool) -> None:
    """Declines (`NotImplementedError`) a backward whose dQ or dK/dV kernel exceeds
    the GPU's shared memory (arguments as for `smem_needed`)."""
    why = f"D={s.d}, Dv={s.dv}, block_kv={s.block_kv}, num_stages={s.num_stages}"
    needed = smem_needed(s, dtype, specs, want_tables)
    check_smem("dQ kernel", needed["dQ"], why)
    if grad_tables(specs, want_tables, DKV_TABLE_KINDS):
        why += "; with the shear buffer of a relative-position table's gradient"
    check_smem("dK/dV kernel", needed["dK/dV"], why)


def _log2_scores(tiles, raw, at, fixed, apply_mask: bool, kv_bound):
    """A backward kernel's recomputed scores in log2 units: the score mod on the
    scaled `raw` tile, then (`apply_mask`: a partial block) the mask. `tiles` are
    the (score, mask) `ModTiles`, `at = (b, h, row0, col0)`, `fixed` makes each
    one's per-program values. Returns them and the score mod's values (its VJP
    reads them)."""
    score_tiles, mask_tiles = tiles
    vals = None
    if score_tiles.mod is not None:
        vals = score_tiles.values(*at, fixed[0]())
        sc = score_tiles.score(raw, *at, vals) * LOG2_E
    else:
        sc = raw * LOG2_E
    if apply_mask:
        mvals = mask_tiles.values(*at, fixed[1]())
        sc = apply_keep(sc, mask_tiles.keep(*at, mvals, kv_bound))
    return sc, vals


def dq_kernel(
    shape: BackwardShape,
    q,
    k,
    v,
    do,
    lse2,
    delta,
    counts,
    blocks,
    score_mod: KernelMod | None,
    mask_mod: KernelMod,
    want_tables: bool,
):
    """dQ `(B, Hq, Lq_pad, D)` (q's dtype) and, per differentiated table, its
    per-query-row gradient partials `(B, Hq, Lq_pad)` float32."""
    s = shape
    dtype = q.dtype
    bkv, stages = s.block_kv, s.num_stages
    mq = s.lq_pad // PROGRAM_ROWS
    mask_b, mask_h = blocks.shape[:2]
    mods = KernelMods(score_mod, mask_mod, s)
    specs = None if score_mod is None else score_mod.specs
    grads = grad_tables(specs, want_tables, DQ_TABLE_KINDS)
    tile = (ROWS, bkv)
    named_barriers = NamedBarriers(  # K, V slots released
        not s.interpret,
        {
            "k_released": Handoff(stages, arrivals=CONSUMERS, waiters=1),
            "v_released": Handoff(stages, arrivals=CONSUMERS, waiters=1),
        },
    )

    def kernel(
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, counts_ref, blocks_ref, *refs
    ):
        score_tiles, mask_tiles, (dq_ref, *grad_refs, scoped) = mods.tiles(
            refs, tile, "q"
        )
        smem = scoped.smem
        k_smem, v_smem = smem["k"], smem["v"]
        k_barriers, v_barriers, q_barriers = (
            scoped.barriers[n] for n in ("k", "v", "q_do")
        )
        k_released = scoped.signals["k_released"]
        v_released = scoped.signals["v_released"]

        h = lax.axis_index("heads")
        qi = mq - 1 - lax.axis_index("q")
        b = lax.axis_index("batch")
        wg = lax.axis_index("wg")
        mb = b if mask_b > 1 else 0
        mh = h if mask_h > 1 else 0
        n_full = counts_ref[mb, mh, qi, 0]
        n_all = counts_ref[mb, mh, qi, 1]

        def consumer():
            q_smem, do_smem = smem["q"].at[wg], smem["do"].at[wg]
            q0 = qi * PROGRAM_ROWS + wg * ROWS
            rows = (b, h, pl.ds(q0, ROWS))
            plgpu.copy_gmem_to_smem(q_ref.at[rows], q_smem, q_barriers.at[2 * wg])
            plgpu.copy_gmem_to_smem(do_ref.at[rows], do_smem, q_barriers.at[2 * wg + 1])
            lse = plgpu.load(lse_ref.at[rows], layout=ROW, optimized=False)
            dlt = plgpu.load(delta_ref.at[rows], layout=ROW, optimized=False)
            score_fixed = score_tiles.fixed(b, h, q0)
            mask_fixed = mask_tiles.fixed(b, h, q0)
            plgpu.barrier_wait(q_barriers.at[2 * wg])
            plgpu.barrier_wait(q_barriers.at[2 * wg + 1])
            a_smem = None if smem["ds"] is None else smem["ds"].at[wg]

            dq = plgpu.layout_cast(jnp.zeros((ROWS, s.d), jnp.float32), WG)
            sums = [
                plgpu.layout_cast(jnp.zeros((ROWS,), jnp.float32), ROW) for _ in grads
            ]

            def step(t, carry, *, apply_mask):
                dq, sums = carry
                slot = lax.rem(t, jnp.int32(stages))
                kv0 = blocks_ref[mb, mh, qi, t] * bkv
                plgpu.barrier_wait(k_barriers.at[slot])
                plgpu.barrier_wait(v_barriers.at[slot])
                # S = Q Kᵀ and dP = dO Vᵀ in flight together.
                raw, dp = mma_group(
                    [
                        (tile, q_smem, k_smem.at[slot].T, None),
                        (tile, do_smem, v_smem.at[slot].T, None),
                    ],
                    s.interpret,
                )
                v_released.arrive(slot)
                raw = raw * s.scale
                sc, vals = _log2_scores(
                    (score_tiles, mask_tiles),
                    raw,
                    (b, h, q0, kv0),
                    (lambda: score_fixed, lambda: mask_fixed),
                    apply_mask,
                    mods.kv_bound,
                )
                p = jnp.exp2(sc - rowwise(lse, sc))
                ds = p * (dp - rowwise(dlt, dp))
                if score_mod is not None:
                    ds, dvals = score_tiles.score_vjp(
                        raw, b, h, q0, kv0, vals, ds, bool(grads)
                    )
                    sums = [
                        acc + jnp.sum(dvals[i], axis=1) for acc, i in zip(sums, grads)
                    ]
                (dq,) = mma_group(
                    [(dq, ds.astype(dtype), k_smem.at[slot], a_smem)], s.interpret
                )
                k_released.arrive(slot)
                return dq, sums

            dq, sums = sweep(step, n_full, n_all, (dq, sums))
            q_smem[...] = (dq * s.scale).astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_smem, dq_ref.at[rows])
            for j, (ref, acc) in enumerate(zip(grad_refs, sums)):
                row_smem = smem["row_sums"].at[wg, j]
                row_smem[...] = acc
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(row_smem, ref.at[rows])
            plgpu.wait_smem_to_gmem(0)

        def producer():
            kvh = lax.div(h, jnp.array(s.groups, h.dtype))
            produce_kv(
                lambda t: blocks_ref[mb, mh, qi, t],
                lambda blk: (b, kvh, pl.ds(blk * bkv, bkv)),
                (k_ref, v_ref),
                (k_smem, v_smem),
                (k_barriers, v_barriers),
                (k_released, v_released),
                n_all,
                stages,
            )
            drain(n_all, stages, (k_released, v_released))

        split_warpgroups(wg, consumer, producer)

    def entry(*refs):
        run_scoped_warpgroups(
            lambda scoped: kernel(*refs, scoped),
            *_dq_scratch(s, dtype, len(grads)),
            named_barriers,
        )

    out_type = [jax.ShapeDtypeStruct((s.b, s.hq, s.lq_pad, s.d), dtype)]
    out_type += [
        jax.ShapeDtypeStruct((s.b, s.hq, s.lq_pad), jnp.float32) for _ in grads
    ]
    grid, grid_names = (s.hq, mq, s.b), ("heads", "q", "batch")
    outs = warp_specialized(entry, tuple(out_type), grid, grid_names, s.interpret)(
        q, k, v, do, lse2, delta, counts, blocks, *mods.tables
    )
    return outs[0], dict(zip(grads, outs[1:]))


def dkv_kernel(
    shape: BackwardShape,
    q,
    k,
    v,
    do,
    lse2,
    delta,
    counts,
    work,
    score_mod: KernelMod | None,
    mask_mod: KernelMod,
    want_tables: bool = False,
):
    """dK `(B, Hkv, Lkv_pad, D)` and dV `(B, Hkv, Lkv_pad, Dv)` in k's dtype, and
    (`want_tables`) per float "diag" table of the score mod, its gradient partials
    `(B, Hq, Lkv_pad / 64, Lq_pad / 64, 128)` float32: entry `[b, h, kt, qt, x]` sums
    the table's cotangents on the diagonal `kv_idx - q_idx = 64 (kt - qt) + 64 - x`
    of the 64x64 tile of key tile `kt` and query tile `qt` (written where the tile
    is visited only: the others hold garbage).

    `work (B|1, Hkv, Nkv, G·Mq)`: per key block, the query tiles (64 rows) to visit,
    coded `j·Mq + i` (query head `kv_head·G + j`, tile `i`), full ones first;
    `counts (B|1, Hkv, Nkv, 2)`: the number of full ones and of all.
    """
    s = shape
    dtype = q.dtype
    stages = s.num_stages
    nkv = s.lkv_pad // PROGRAM_ROWS
    mq = s.lq_pad // ROWS
    work_b = work.shape[0]
    mods = KernelMods(score_mod, mask_mod, s)
    tile = (ROWS, ROWS)  # (keys, queries)
    specs = None if score_mod is None else score_mod.specs
    diag_grads = grad_tables(specs, want_tables, DKV_TABLE_KINDS)
    named_barriers = NamedBarriers(  # Q/dO/lse/delta slots released
        not s.interpret,
        {"released": Handoff(stages, arrivals=CONSUMERS, waiters=1)},
        warpgroup_syncs=True,  # the diagonal sums' shear buffer
    )

    def kernel(
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, counts_ref, work_ref, *refs
    ):
        score_tiles, mask_tiles, (dk_ref, dv_ref, *diag_refs, scoped) = mods.tiles(
            refs, tile, "kv"
        )
        smem = scoped.smem
        released = scoped.signals["released"]
        q_smem, do_smem, lse_smem, dlt_smem = (
            smem[n] for n in ("q", "do", "lse", "delta")
        )
        q_bars, do_bars, lse_bars, dlt_bars, kv_bars = (
            scoped.barriers[n] for n in ("q", "do", "lse", "delta", "k_v")
        )

        kvh = lax.axis_index("heads")
        ki = nkv - 1 - lax.axis_index("kv")
        b = lax.axis_index("batch")
        wg = lax.axis_index("wg")
        wb = b if work_b > 1 else 0
        n_full = counts_ref[wb, kvh, ki, 0]
        n_all = counts_ref[wb, kvh, ki, 1]

        def decode(t):
            code = work_ref[wb, kvh, ki, t]
            j = lax.div(code, jnp.int32(mq))
            return kvh * s.groups + j, lax.rem(code, jnp.int32(mq))

        def consumer():
            k_smem, v_smem = smem["k"].at[wg], smem["v"].at[wg]
            kv0 = ki * PROGRAM_ROWS + wg * ROWS
            keys = (b, kvh, pl.ds(kv0, ROWS))
            plgpu.copy_gmem_to_smem(k_ref.at[keys], k_smem, kv_bars.at[2 * wg])
            plgpu.copy_gmem_to_smem(v_ref.at[keys], v_smem, kv_bars.at[2 * wg + 1])
            plgpu.barrier_wait(kv_bars.at[2 * wg])
            plgpu.barrier_wait(kv_bars.at[2 * wg + 1])
            p_ds = smem["p_ds"]
            a_smem = lambda i: None if p_ds is None else p_ds.at[wg, i]
            dk = plgpu.layout_cast(jnp.zeros((ROWS, s.d), jnp.float32), WG)
            dv = plgpu.layout_cast(jnp.zeros((ROWS, s.dv), jnp.float32), WG)
            if diag_grads:
                shear = smem["shear"].at[wg]
                shear[...] = plgpu.layout_cast(
                    jnp.zeros((ROWS, SHEAR_WIDTH), jnp.float32), WG
                )
                sync = named_barriers.warpgroup_sync(wg)

            def step(t, carry, *, apply_mask):
                dk, dv = carry
                slot = lax.rem(t, jnp.int32(stages))
                h, qt = decode(t)
                q0 = qt * ROWS
                plgpu.barrier_wait(q_bars.at[slot])
                plgpu.barrier_wait(do_bars.at[slot])
                # Sᵀ = K Qᵀ and dPᵀ = V dOᵀ in flight together.
                raw, dpt = mma_group(
                    [
                        (tile, k_smem, q_smem.at[slot].T, None),
                        (tile, v_smem, do_smem.at[slot].T, None),
                    ],
                    s.interpret,
                )
                raw = raw * s.scale
                sc, vals = _log2_scores(
                    (score_tiles, mask_tiles),
                    raw,
                    (b, h, kv0, q0),
                    (
                        lambda: score_tiles.fixed(b, h, kv0),
                        lambda: mask_tiles.fixed(b, h, kv0),
                    ),
                    apply_mask,
                    mods.kv_bound,
                )
                plgpu.barrier_wait(lse_bars.at[slot])
                lse = plgpu.load(lse_smem.at[slot], layout=COL)
                pt = jnp.exp2(sc - lax.broadcast_in_dim(lse, tile, (1,)))
                plgpu.barrier_wait(dlt_bars.at[slot])
                dlt = plgpu.load(dlt_smem.at[slot], layout=COL)
                dst = pt * (dpt - lax.broadcast_in_dim(dlt, tile, (1,)))
                dvals = {}
                if score_mod is not None:
                    dst, dvals = score_tiles.score_vjp(
                        raw, b, h, kv0, q0, vals, dst, bool(diag_grads)
                    )

                def diagonals():  # "diag" table partials, while the wgmmas run
                    for i, ref in zip(diag_grads, diag_refs):
                        sums = diagonal_sums(dvals[i], shear, sync)
                        ref.at[b, h, 2 * ki + wg, qt][...] = sums

                # dV += Pᵀ dO and dK += dSᵀ Q in flight together.
                dv, dk = mma_group(
                    [
                        (dv, pt.astype(dtype), do_smem.at[slot], a_smem(0)),
                        (dk, dst.astype(dtype), q_smem.at[slot], a_smem(1)),
                    ],
                    s.interpret,
                    diagonals if diag_grads else None,
                )
                released.arrive(slot)
                return dk, dv

            dk, dv = sweep(step, n_full, n_all, (dk, dv))
            k_smem[...] = (dk * s.scale).astype(dtype)
            v_smem[...] = dv.astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(k_smem, dk_ref.at[keys])
            plgpu.copy_smem_to_gmem(v_smem, dv_ref.at[keys])
            plgpu.wait_smem_to_gmem(0)

        def producer():
            def fetch(t, slot):
                h, qt = decode(t)
                rows = (b, h, pl.ds(qt * ROWS, ROWS))
                plgpu.copy_gmem_to_smem(
                    q_ref.at[rows], q_smem.at[slot], q_bars.at[slot]
                )
                plgpu.copy_gmem_to_smem(
                    do_ref.at[rows], do_smem.at[slot], do_bars.at[slot]
                )
                plgpu.copy_gmem_to_smem(
                    lse_ref.at[rows], lse_smem.at[slot], lse_bars.at[slot]
                )
                plgpu.copy_gmem_to_smem(
                    delta_ref.at[rows], dlt_smem.at[slot], dlt_bars.at[slot]
                )

            produce(fetch, n_all, stages, (released,))
            drain(n_all, stages, (released,))

        split_warpgroups(wg, consumer, producer)

    def entry(*refs):
        run_scoped_warpgroups(
            lambda scoped: kernel(*refs, scoped),
            *_dkv_scratch(s, dtype, bool(diag_grads)),
            named_barriers,
        )

    out_type = (
        jax.ShapeDtypeStruct((s.b, s.hkv, s.lkv_pad, s.d), dtype),
        jax.ShapeDtypeStruct((s.b, s.hkv, s.lkv_pad, s.dv), dtype),
    ) + tuple(
        jax.ShapeDtypeStruct((s.b, s.hq, s.lkv_pad // ROWS, mq, DIAGONALS), jnp.float32)
        for _ in diag_grads
    )
    grid, grid_names = (s.hkv, nkv, s.b), ("heads", "kv", "batch")
    dk, dv, *partials = warp_specialized(
        entry, out_type, grid, grid_names, s.interpret
    )(q, k, v, do, lse2, delta, counts, work, *mods.tables)
    return dk, dv, dict(zip(diag_grads, partials))
