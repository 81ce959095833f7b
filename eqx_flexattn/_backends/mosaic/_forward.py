"""The Pallas Mosaic GPU forward kernel (Hopper): block-sparse flash attention.

One program per (query head, query block, batch), or persistent programs that
each walk a share of them (`TileSchedule`); a query block is `2 * block_q`
rows, one `block_q`-row half per consumer warpgroup, and is one row of the
`BlockMask` (at tile size `(2 * block_q, block_kv)`). A third, producer warpgroup
streams the K/V tiles that the row's block list names into a `num_stages`-deep
shared-memory ring by TMA: full blocks first, then partial ones. The consumers share
each K/V tile: Q·Kᵀ and P·V run on the tensor cores (wgmma), the two warpgroups
ping-pong so that one's softmax overlaps the other's matmuls (FlashAttention-3), the
score mod runs on every tile and the mask mod on partial tiles only, both evaluated
elementwise from the mods' hoisted tables (`_mods.KernelMod`). Softmax runs in
base 2 in float32 (`_tiles`); output and lse are written by TMA.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from ..._mods import KernelMod
from .._tiles import LN_2, LOG2_E, rowwise, softmax_finish, softmax_step
from ._mod_tiles import apply_keep, KernelMods
from ._pipeline import (
    accumulate_mma,
    check_smem,
    CONSUMERS,
    drain,
    Handoff,
    NamedBarriers,
    produce_kv,
    ROW,
    run_scoped_warpgroups,
    smem_bytes,
    split_warpgroups,
    sweep,
    swizzled,
    warp_specialized,
    WG,
)


@dataclasses.dataclass(frozen=True)
class ForwardShape:
    """Static sizes of one forward call (lengths padded to the tiles)."""

    b: int
    hq: int
    hkv: int
    lq: int  # true lengths
    lkv: int
    lq_pad: int
    lkv_pad: int
    d: int
    dv: int
    block_q: int  # rows per consumer warpgroup
    block_kv: int
    num_stages: int
    scale: float
    interpret: bool
    programs: int = 0  # persistent programs (0: one program per tile)

    @property
    def groups(self) -> int:
        return self.hq // self.hkv

    @property
    def schedule(self) -> TileSchedule:
        mq = self.lq_pad // tile_rows(self.block_q)
        return TileSchedule(self.hq, mq, self.b, self.programs)


@dataclasses.dataclass(frozen=True)
class TileSchedule:
    """Which query tiles (head, query block, batch) each program of the forward runs,
    heaviest (last) query blocks first (FA3's tile schedulers; tokamax's
    `grid_loop`): one program per tile (`programs=0`), or `programs` persistent
    programs (at most one per tile), each taking every `programs`-th tile, the K/V
    ring streaming on across its tiles."""

    hq: int
    mq: int  # query blocks
    b: int
    programs: int

    @property
    def n_tiles(self) -> int:
        return self.hq * self.mq * self.b

    @property
    def persistent(self) -> bool:
        return self.programs > 0

    @property
    def n_programs(self) -> int:
        return min(self.programs, self.n_tiles)

    @property
    def grid(self) -> tuple[tuple, tuple]:
        """`(grid, grid_names)` of the kernel."""
        if self.persistent:
            return (self.n_programs,), ("programs",)
        return (self.hq, self.mq, self.b), ("heads", "q", "batch")

    def tile(self, k):
        """(head, query block, batch) of the program's `k`-th tile."""
        if not self.persistent:
            h, r, b = (lax.axis_index(n) for n in ("heads", "q", "batch"))
            return h, self.mq - 1 - r, b
        item = lax.axis_index("programs") + k * self.n_programs
        h = lax.rem(item, jnp.int32(self.hq))
        rest = lax.div(item, jnp.int32(self.hq))
        b = lax.rem(rest, jnp.int32(self.b))
        return h, self.mq - 1 - lax.div(rest, jnp.int32(self.b)), b

    def for_each_tile(self, body):
        """`body(k, steps) -> steps` over the program's tiles, `steps` counting the
        K/V blocks streamed so far (the ring continues across tiles); returns it. One
        program per tile: a single call."""
        if not self.persistent:
            return body(0, 0)
        pid = lax.axis_index("programs")
        n_mine = lax.div(self.n_tiles - 1 - pid, jnp.int32(self.n_programs)) + 1
        return lax.fori_loop(jnp.int32(0), n_mine, body, jnp.int32(0))


def _named_barriers(s: ForwardShape) -> NamedBarriers:
    """The forward's hand-offs: each consumer releases K and V ring slots to the
    producer; the consumers pass the tensor cores to each other (`turn[w]`:
    warpgroup w's go) and, in a persistent kernel, meet between tiles (`meet`: both
    may go on)."""
    stages = s.num_stages
    handoffs = {
        "k_released": Handoff(stages, arrivals=CONSUMERS, waiters=1),
        "v_released": Handoff(stages, arrivals=CONSUMERS, waiters=1),
        "turn": Handoff(CONSUMERS, arrivals=1, waiters=1),
    }
    if s.schedule.persistent:
        handoffs["meet"] = Handoff(1, arrivals=CONSUMERS, waiters=0)
    return NamedBarriers(not s.interpret, handoffs)


def _scratch(s: ForwardShape, dtype) -> tuple[dict, dict]:
    """The forward's shared-memory buffers and TMA barriers, by name."""
    bq, bkv, stages = s.block_q, s.block_kv, s.num_stages
    smem = {
        "q": plgpu.SMEM((CONSUMERS, bq, s.d), dtype, transforms=swizzled()),
        "k": plgpu.SMEM((stages, bkv, s.d), dtype, transforms=swizzled()),
        "v": plgpu.SMEM((stages, bkv, s.dv), dtype, transforms=swizzled()),
        # The output tile reuses Q's buffer when the head dims agree.
        "o": None
        if s.dv == s.d
        else plgpu.SMEM((CONSUMERS, bq, s.dv), dtype, transforms=swizzled()),
        "lse": plgpu.SMEM((CONSUMERS, bq), jnp.float32),
        # P staged in shared memory, in interpret mode only (its wgmma takes no
        # register operand).
        "p": plgpu.SMEM((CONSUMERS, bq, bkv), dtype, transforms=swizzled())
        if s.interpret
        else None,
    }
    barriers = {
        "k": plgpu.Barrier(num_barriers=stages),
        "v": plgpu.Barrier(num_barriers=stages),
        "q": plgpu.Barrier(num_barriers=CONSUMERS),
    }
    return smem, barriers


def smem_needed(s: ForwardShape, dtype) -> int:
    """Bytes of shared memory the forward takes on the GPU (its softmax reduces)."""
    return smem_bytes(*_scratch(dataclasses.replace(s, interpret=False), dtype), True)


def check_fits(s: ForwardShape, dtype) -> None:
    """Declines (`NotImplementedError`) a forward whose buffers exceed the GPU's
    shared memory."""
    why = f"D={s.d}, Dv={s.dv}, block_kv={s.block_kv}, num_stages={s.num_stages}"
    check_smem("forward kernel", smem_needed(s, dtype), why)


def forward(
    shape: ForwardShape,
    q,
    k,
    v,
    counts,
    blocks,
    score_mod: KernelMod | None,
    mask_mod: KernelMod,
):
    """Runs the kernel on padded `q (B, Hq, Lq_pad, D)`, `k (B, Hkv, Lkv_pad, D)`,
    `v (B, Hkv, Lkv_pad, Dv)`; `counts (B|1, H|1, Mq, 2)` int32 holds each query
    block's number of full blocks and of all blocks, `blocks (B|1, H|1, Mq, Nkv)` its
    key blocks, full ones first. Returns `out (B, Hq, Lq_pad, Dv)` in q's dtype and
    `lse (B, Hq, Lq_pad)` float32 (natural log)."""
    s = shape
    dtype = q.dtype
    bq, bkv, stages = s.block_q, s.block_kv, s.num_stages
    mask_b, mask_h = blocks.shape[:2]
    mods = KernelMods(score_mod, mask_mod, s)
    schedule = s.schedule
    persistent = schedule.persistent
    named_barriers = _named_barriers(s)

    def kernel(q_ref, k_ref, v_ref, counts_ref, blocks_ref, *refs):
        score_tiles, mask_tiles, (out_ref, lse_ref, scoped) = mods.tiles(
            refs, (bq, bkv), "q"
        )
        smem, signals = scoped.smem, scoped.signals
        k_smem, v_smem = smem["k"], smem["v"]
        k_barriers, v_barriers, q_barriers = (
            scoped.barriers[n] for n in ("k", "v", "q")
        )
        k_released, v_released, turn = (
            signals[n] for n in ("k_released", "v_released", "turn")
        )
        meet = signals.get("meet")
        wg = lax.axis_index("wg")

        def block_list(k):
            h, qi, b = schedule.tile(k)
            mb = b if mask_b > 1 else 0
            mh = h if mask_h > 1 else 0
            n_full = counts_ref[mb, mh, qi, 0]
            n_all = counts_ref[mb, mh, qi, 1]
            return (h, qi, b), n_full, n_all, lambda t: blocks_ref[mb, mh, qi, t]

        def ring_slot(i):
            return i % stages if isinstance(i, int) else lax.rem(i, jnp.int32(stages))

        def consume_tile(k, steps, q_smem):
            (h, qi, b), n_full, n_all, block_at = block_list(k)
            q0 = qi * (2 * bq) + wg * bq
            plgpu.copy_gmem_to_smem(
                q_ref.at[b, h, pl.ds(q0, bq)], q_smem, q_barriers.at[wg]
            )
            # Hoisted mod tables: per-tile scalars and query-block slices are read
            # once; key-block slices at every step.
            score_static = score_tiles.fixed(b, h, q0)
            mask_static = mask_tiles.fixed(b, h, q0)
            plgpu.barrier_wait(q_barriers.at[wg])

            m_i = plgpu.layout_cast(jnp.full((bq,), -jnp.inf, jnp.float32), ROW)
            l_i = plgpu.layout_cast(jnp.full((bq,), 0.0, jnp.float32), ROW)
            acc = plgpu.layout_cast(jnp.full((bq, s.dv), 0.0, jnp.float32), WG)

            @pl.when(n_all > 0)
            def wait_first_k():
                plgpu.barrier_wait(k_barriers.at[ring_slot(steps)])

            if persistent:
                # Both consumers are done with the previous tile's turns (warpgroup
                # 0's last go must reach warpgroup 1 before its next Q·Kᵀ does). A
                # rendezvous, not two hand-offs: after a tile with an empty block
                # list, nothing else would keep warpgroup 0 a round behind.
                meet.meet(0)
            pl.when(wg == 1)(lambda: turn.wait(1))  # warpgroup 0 goes first

            def step(t, carry, *, apply_mask: bool):
                acc, m_i, l_i = carry
                slot = ring_slot(steps + t)
                kv0 = block_at(t) * bkv

                def compute_qk(acc_ref):
                    plgpu.wgmma(acc_ref, q_smem, k_smem.at[slot].T)
                    turn.arrive(1 - wg)  # the other's P·V may start
                    return acc_ref[...]

                sc = pl.run_scoped(compute_qk, plgpu.ACC((bq, bkv), jnp.float32))
                k_released.arrive(slot)
                if score_mod is None:
                    sc = sc * (s.scale * LOG2_E)
                else:
                    vals = score_tiles.values(b, h, q0, kv0, score_static)
                    sc = score_tiles.score(sc * s.scale, b, h, q0, kv0, vals)
                    sc = sc * LOG2_E
                if apply_mask:
                    vals = mask_tiles.values(b, h, q0, kv0, mask_static)
                    keep = mask_tiles.keep(b, h, q0, kv0, vals, mods.kv_bound)
                    sc = apply_keep(sc, keep)
                m_i, alpha, p = softmax_step(m_i, sc, jnp.exp2)
                acc = acc * rowwise(alpha, acc)
                l_i = l_i * alpha
                p16 = p.astype(dtype)

                def end_softmax_barriers():
                    plgpu.barrier_wait(v_barriers.at[slot])
                    turn.wait(wg)  # the other's Q·Kᵀ is issued

                if s.dv <= 128:
                    l_i = l_i + p.sum(axis=1)
                    acc, l_i, m_i, p16 = lax.optimization_barrier((acc, l_i, m_i, p16))
                    end_softmax_barriers()
                else:
                    end_softmax_barriers()
                    l_i = l_i + p.sum(axis=1)

                def wait_next_k():
                    @pl.when(t + 1 < n_all)
                    def wait():
                        plgpu.barrier_wait(k_barriers.at[ring_slot(steps + t + 1)])

                p_smem = None if smem["p"] is None else smem["p"].at[wg]
                acc = accumulate_mma(acc, p16, v_smem.at[slot], p_smem, wait_next_k)
                v_released.arrive(slot)
                return acc, m_i, l_i

            acc, m_i, l_i = sweep(step, n_full, n_all, (acc, m_i, l_i))
            pl.when(wg == 0)(lambda: turn.arrive(1))  # warpgroup 1's last go

            out, lse2 = softmax_finish(acc, l_i, m_i, jnp.log2)
            o_smem = (smem["q"] if smem["o"] is None else smem["o"]).at[wg]
            o_smem[...] = out.astype(dtype)
            lse_smem = smem["lse"].at[wg]
            lse_smem[...] = lse2 * LN_2
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem, out_ref.at[b, h, pl.ds(q0, bq)])
            plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[b, h, pl.ds(q0, bq)])
            # The next tile's Q (and lse) may overwrite the buffers once read.
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            return steps + n_all

        def consumer():
            q_smem = smem["q"].at[wg]
            schedule.for_each_tile(lambda k, steps: consume_tile(k, steps, q_smem))
            plgpu.wait_smem_to_gmem(0)

        def producer():
            def produce_tile(k, steps):
                (h, _, b), _, n_all, block_at = block_list(k)
                kvh = lax.div(h, jnp.array(s.groups, h.dtype))
                produce_kv(
                    block_at,
                    lambda blk: (b, kvh, pl.ds(blk * bkv, bkv)),
                    (k_ref, v_ref),
                    (k_smem, v_smem),
                    (k_barriers, v_barriers),
                    (k_released, v_released),
                    n_all,
                    stages,
                    steps,
                )
                return steps + n_all

            steps = schedule.for_each_tile(produce_tile)
            drain(steps, stages, (k_released, v_released))

        split_warpgroups(wg, consumer, producer)

    def entry(q_ref, k_ref, v_ref, counts_ref, blocks_ref, *refs):
        run_scoped_warpgroups(
            lambda scoped: kernel(
                q_ref, k_ref, v_ref, counts_ref, blocks_ref, *refs, scoped
            ),
            *_scratch(s, dtype),
            named_barriers,
        )

    out_type = (
        jax.ShapeDtypeStruct((s.b, s.hq, s.lq_pad, s.dv), dtype),
        jax.ShapeDtypeStruct((s.b, s.hq, s.lq_pad), jnp.float32),
    )
    grid, grid_names = schedule.grid
    return warp_specialized(entry, out_type, grid, grid_names, s.interpret)(
        q, k, v, counts, blocks, *mods.tables
    )


def tile_rows(block_q: int) -> int:
    """Query rows per program (one BlockMask row)."""
    return 2 * block_q


def padded(length: int, tile: int) -> int:
    return math.ceil(length / tile) * tile
