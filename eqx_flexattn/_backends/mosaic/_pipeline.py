"""The pipeline every Mosaic GPU kernel of this package shares: warp specialisation
(two consumer warpgroups and a producer, their register budgets), the producer's TMA
ring, the hand-offs between warpgroups (`Signals` on hardware named barriers, every
id from one registry: `BarrierId`, `NamedBarriers`), scoped shared memory by name
(`Scoped`) and its size (`smem_bytes`), and the consumers' batched wgmmas.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu


WG = plgpu.Layout.WGMMA
ROW = plgpu.Layout.WGMMA.reduce(1)  # one value per tile row
COL = plgpu.Layout.WGMMA.reduce(0)  # one value per tile column

# A program: two consumer warpgroups of `WGMMA_ROWS` rows each, then a producer.
WGMMA_ROWS = 64  # rows of a wgmma, and of a consumer warpgroup's tiles
WARPGROUP_THREADS = 128
CONSUMERS = 2  # warpgroups 0 and 1; the producer is warpgroup `CONSUMERS`
# Registers per thread (`setmaxnreg`): 2 x 128 x 232 + 128 x 40 = 64,512 of 65,536.
CONSUMER_REGISTERS = 232
PRODUCER_REGISTERS = 40


def swizzled() -> tuple:
    """The transforms of a shared-memory tile that TMA and wgmma read: 8x64 tiles,
    128-byte swizzle."""
    return (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))


def split_warpgroups(wg, consumer: Callable[[], None], producer: Callable[[], None]):
    """Warp specialisation: `consumer()` on the consumer warpgroups, their register
    budget raised, then `producer()` on the producer warpgroup, its budget lowered
    (`wg`: this warpgroup's index)."""

    @pl.when(wg < CONSUMERS)
    def _consumer():
        plgpu.set_max_registers(CONSUMER_REGISTERS, action="increase")
        consumer()

    @pl.when(wg == CONSUMERS)
    def _producer():
        plgpu.set_max_registers(PRODUCER_REGISTERS, action="decrease")
        producer()


# ---------------------------------------------------------------- shared memory

SM90_SMEM_BYTES = 227 * 1024  # shared memory a block may opt into on sm90
SMEM_ALIGNMENT = 1024  # Mosaic GPU starts every scoped buffer at a multiple of it
# What Mosaic GPU reserves for a kernel that reduces over a tile's axis (jax's
# default `CompilerParams.reduction_scratch_bytes`).
REDUCTION_SCRATCH_BYTES = 128 * 4 * 4
MBARRIER_BYTES = 8


def smem_available() -> int:
    """Shared memory per block on this machine's GPU, as Mosaic GPU counts it: sm90's
    227 KiB where there is no GPU (lowering or interpreting on a CPU)."""
    device = jax.devices()[0]
    return int(getattr(device, "shared_memory_per_block_optin", SM90_SMEM_BYTES))


def smem_bytes(smem: dict, barriers: dict, reduces: bool) -> int:
    """The shared memory Mosaic GPU allocates for a kernel's scoped buffers `smem`
    (name: `plgpu.SMEM` or None) and TMA `barriers` (name: `plgpu.Barrier`), plus
    its reduction scratch where the kernel `reduces` (tokamax's
    `_estimate_shared_mem_usage_bytes`, here exact)."""
    align = lambda n: -(-n // SMEM_ALIGNMENT) * SMEM_ALIGNMENT
    total = sum(
        align(math.prod(buf.shape) * jnp.dtype(buf.dtype).itemsize)
        for buf in smem.values()
        if buf is not None
    )
    total += REDUCTION_SCRATCH_BYTES if reduces else 0
    n_barriers = sum(
        math.prod(np.atleast_1d(b.num_barriers)) for b in barriers.values()
    )
    return total + MBARRIER_BYTES * int(n_barriers)


def check_smem(kernel: str, needed: int, why: str) -> None:
    """Raises `NotImplementedError` (a decline) where `needed` bytes of shared
    memory exceed what a block has; `why` names the sizes that set it."""
    available = smem_available()
    if needed > available:
        raise NotImplementedError(
            f"its {kernel} needs {needed:,} bytes of shared memory ({why}), more "
            f"than the {available:,} a block has."
        )


# ---------------------------------------------------------------- named barriers


class BarrierId(enum.IntEnum):
    """The hardware named barriers of a CTA (16 on sm90) and their owners: every id
    a kernel of this package uses comes from here (FA3's `named_barrier.hpp`)."""

    CTA = 0  # `bar.sync 0`: the whole CTA
    MOSAIC_GPU = 1  # 1-3: Mosaic GPU's own, one per warpgroup
    HANDOFFS = 4  # 4, 5, ...: a kernel's `Handoff`s, allotted by `NamedBarriers`
    WARPGROUP_SYNC = 14  # 14 + w: consumer warpgroup w alone (`warpgroup_sync`)
    COUNT = 16


@dataclasses.dataclass(frozen=True)
class Handoff:
    """`count` one-way hand-offs (one per ring slot, say): a party of `arrivals`
    warpgroups arrives on hand-off `i` and `waiters` warpgroups wait for it
    (`waiters=0`: a rendezvous of the arrivals, `Signals.meet`)."""

    count: int
    arrivals: int
    waiters: int


class NamedBarriers:
    """Every named barrier of one kernel: its hand-offs by name (`handoffs`, in
    order), with consecutive ids from `BarrierId.HANDOFFS`, and, with
    `warpgroup_syncs`, one sync of each consumer warpgroup alone at
    `BarrierId.WARPGROUP_SYNC`. `named=False` (the interpreter, which has no named
    barriers): mbarriers (`scratch`) stand in for the hand-offs.

    Raises `ValueError` where the hand-offs need more ids than there are.
    """

    def __init__(self, named: bool, handoffs: dict, warpgroup_syncs: bool = False):
        self.named = named
        self.handoffs: dict[str, Handoff] = dict(handoffs)
        self.warpgroup_syncs = warpgroup_syncs
        self.first_ids: dict[str, int] = {}
        next_id = int(BarrierId.HANDOFFS)
        for name, handoff in self.handoffs.items():
            self.first_ids[name] = next_id
            next_id += handoff.count
        end = BarrierId.WARPGROUP_SYNC if warpgroup_syncs else BarrierId.COUNT
        if next_id > end:
            raise ValueError(
                f"{next_id - BarrierId.HANDOFFS} named barriers needed, "
                f"{end - BarrierId.HANDOFFS} available"
            )

    def scratch(self) -> tuple:
        """The scoped allocations of the interpreter's stand-in mbarriers (Nones
        with named barriers)."""
        if self.named:
            return tuple(None for _ in self.handoffs)
        return tuple(
            plgpu.Barrier(num_arrivals=h.arrivals, num_barriers=h.count)
            for h in self.handoffs.values()
        )

    def signals(self, mbarriers) -> dict[str, Signals]:
        """Each hand-off's `Signals`, by name (`mbarriers`: `scratch`'s refs)."""
        out = {}
        for (name, h), bars in zip(self.handoffs.items(), mbarriers):
            if self.named:
                out[name] = Signals(h.arrivals, h.waiters, self.first_ids[name])
            else:
                out[name] = Signals(h.arrivals, h.waiters, mbarriers=bars)
        return out

    def warpgroup_sync(self, wg) -> Callable[[], None]:
        """A barrier of the threads of consumer warpgroup `wg` alone; a no-op in the
        interpreter, which runs a warpgroup's code in order."""
        if not self.warpgroup_syncs:
            raise ValueError("this kernel reserved no warpgroup syncs")
        barrier_id = int(BarrierId.WARPGROUP_SYNC) + wg
        if not self.named:
            return lambda: None
        return lambda: _named_barrier("sync", barrier_id, WARPGROUP_THREADS)


def mma_group(products, interpret: bool, during=None) -> tuple:
    """`acc + a @ b_ref` for every `(acc, a, b_ref, a_smem)` of `products` on the
    tensor cores: the wgmmas are issued back to back and waited for once, running
    `during()` while they are in flight. `acc` is a float32 tile, or a shape for a
    fresh (zero) one; `a` is a shared-memory ref or a register tile, `b_ref` a
    shared-memory ref; `a_smem` is None, or (interpret mode, register `a`) a
    shared-memory buffer for `a`.

    On the GPU the wgmmas accumulate into `acc` in place. The interpreter runs
    neither register operands nor initialised accumulators: there a register `a`
    goes through its `a_smem` buffer into a fresh accumulator, added afterwards.
    """
    fresh = [isinstance(acc, tuple) for acc, *_ in products]
    shapes = [acc if f else acc.shape for f, (acc, *_) in zip(fresh, products)]
    if not interpret:
        inits = tuple(
            plgpu.ACC.init(
                plgpu.layout_cast(jnp.zeros(shape, jnp.float32), WG) if f else acc
            )
            for f, shape, (acc, *_) in zip(fresh, shapes, products)
        )

        def compute(refs):
            for ref, (_, a, b_ref, _) in zip(refs, products):
                plgpu.wgmma(ref, a, b_ref)
            if during is not None:
                during()

        return tuple(pl.run_state(compute)(inits))

    operands = []
    for _, a, _, a_smem in products:
        if a_smem is not None:
            a_smem[...] = a
            operands.append(a_smem)
        else:
            operands.append(a)
    plgpu.commit_smem()

    def compute_fresh(*refs):
        for ref, a, (_, _, b_ref, _) in zip(refs, operands, products):
            plgpu.wgmma(ref, a, b_ref)
        if during is not None:
            during()
        return tuple(ref[...] for ref in refs)

    out = pl.run_scoped(
        compute_fresh, *(plgpu.ACC(shape, jnp.float32) for shape in shapes)
    )
    return tuple(o if f else acc + o for f, o, (acc, *_) in zip(fresh, out, products))


def accumulate_mma(acc, a, b_ref, a_smem=None, during=None):
    """`acc + a @ b_ref` (`a` in registers); `a_smem` given in interpret mode only
    (see `mma_group`)."""
    return mma_group([(acc, a, b_ref, a_smem)], a_smem is not None, during)[0]


def sweep(step, n_full, n_all, carry):
    """Runs `step(t, carry, apply_mask=...)` over a block list: its full blocks
    `[0, n_full)` without the mask mod, then its partial ones `[n_full, n_all)`."""
    carry = lax.fori_loop(
        jnp.int32(0), n_full, lambda t, c: step(t, c, apply_mask=False), carry
    )
    return lax.fori_loop(n_full, n_all, lambda t, c: step(t, c, apply_mask=True), carry)


def _named_barrier(op: str, barrier_id, threads: int) -> None:
    """PTX `bar.{op}` ("arrive" or "sync") on hardware barrier `barrier_id` (a
    Python int or a traced int32 scalar), completed by `threads` threads."""
    from jaxlib.mlir import ir
    from jaxlib.mlir.dialects import llvm

    void = lambda: ir.Type.parse("!llvm.void")
    if isinstance(barrier_id, int):

        @plgpu.inline_mgpu()
        def static(_):
            asm = f"bar.{op} {barrier_id}, {threads};"
            llvm.inline_asm(void(), [], asm, "", has_side_effects=True)

        static()
    else:

        @plgpu.inline_mgpu(arg_types=(plgpu.Layout.WG_SPLAT,))
        def dynamic(_, idx):
            asm = f"bar.{op} $0, {threads};"
            args = [idx.registers[()]]
            llvm.inline_asm(void(), args, asm, "r", has_side_effects=True)

        dynamic(barrier_id)


@dataclasses.dataclass(frozen=True)
class Signals:
    """`n` one-way hand-offs inside a CTA: a party of `arrivals` warpgroups arrives
    on signal `i` (without waiting) and `waiters` warpgroups wait for it.

    On the GPU these are hardware named barriers (`bar.arrive` / `bar.sync`, ids from
    `first_id`, allotted by `NamedBarriers`): no shared-memory traffic. The
    interpreter has none, so there `mbarriers` (`NamedBarriers.scratch`) stand in.

    The parties must alternate: the arrivals for signal `i` may not run ahead of its
    waiters by a whole round.
    """

    arrivals: int
    waiters: int
    first_id: int = -1
    mbarriers: object = None

    def _id(self, i):
        if isinstance(i, int):
            return self.first_id + i
        return jnp.asarray(i, jnp.int32) + jnp.int32(self.first_id)

    @property
    def _threads(self) -> int:
        return WARPGROUP_THREADS * (self.arrivals + self.waiters)

    def arrive(self, i) -> None:
        if self.mbarriers is None:
            _named_barrier("arrive", self._id(i), self._threads)
        else:
            plgpu.barrier_arrive(self.mbarriers.at[i])

    def wait(self, i) -> None:
        if self.mbarriers is None:
            _named_barrier("sync", self._id(i), self._threads)
        else:
            plgpu.barrier_wait(self.mbarriers.at[i])

    def meet(self, i) -> None:
        """A rendezvous of all `arrivals` warpgroups at signal `i` (with `waiters=0`):
        each arrives and waits for the others. Unlike a pair of one-way hand-offs,
        no party can pass two rounds while another has yet to observe the first."""
        if self.mbarriers is None:
            _named_barrier("sync", self._id(i), self._threads)
        else:
            plgpu.barrier_arrive(self.mbarriers.at[i])
            plgpu.barrier_wait(self.mbarriers.at[i])


def produce(fetch, n_all, stages: int, released, steps=0):
    """The producer warpgroup's loop over one block list: `fetch(t, slot)` for
    `t < n_all` into ring slot `(steps + t) % stages`, `steps` being the blocks
    streamed before (a persistent kernel's earlier tiles); a slot is refilled once
    the consumers released it (every `Signals` of `released`)."""

    @pl.loop(jnp.int32(0), n_all)
    def fill_slot(t):
        step = steps + t
        slot = lax.rem(step, jnp.int32(stages))

        @pl.when(step >= stages)
        def wait_for_release():
            for signals in released:
                signals.wait(slot)

        fetch(t, slot)


def drain(total, stages: int, released) -> None:
    """The producer's last act: observe the last release of every slot used by the
    `total` blocks streamed (so each barrier ends in a completed phase)."""
    for i in range(stages):

        @pl.when(i < total)
        def observe_last_release():
            for signals in released:
                signals.wait(i)


def produce_kv(
    block_at, kv_rows, refs, smem, barriers, released, n_all, stages, steps=0
):
    """The producer of the forward and dQ kernels: streams the K and V tiles of the
    key blocks `block_at(t)` (rows `kv_rows(block)` of `refs = (k_ref, v_ref)`) into
    the ring `smem = (k_smem, v_smem)`, completing `barriers = (k_bars, v_bars)`, each
    slot once `released = (k_released, v_released)` (`Signals`) let it go."""

    def fetch(t, slot):
        rows = kv_rows(block_at(t))
        for ref, buf, bars in zip(refs, smem, barriers):
            plgpu.copy_gmem_to_smem(ref.at[rows], buf.at[slot], bars.at[slot])

    produce(fetch, n_all, stages, released, steps)


def compiler_params(named: bool) -> plgpu.CompilerParams:
    """The kernels' compiler parameters. With named barriers (the GPU), Pallas's
    conservative automatic warpgroup barriers around shared-memory accesses are off:
    no kernel reads and writes one shared-memory region from the same thread, and
    every store the TMA reads is followed by `commit_smem`."""
    return plgpu.CompilerParams(approx_math=True, unsafe_no_auto_barriers=named)


def interpret_params(interpret: bool) -> dict:
    """`plgpu.kernel`'s keyword for the Mosaic GPU interpreter, when asked for."""
    return {"interpret": plgpu.InterpretGPUParams()} if interpret else {}


def warp_specialized(entry, out_type, grid, grid_names, interpret: bool):
    """`plgpu.kernel` of `CONSUMERS + 1` warpgroups (axis "wg": the consumers, then
    the producer) on `grid` (axes `grid_names`)."""
    return plgpu.kernel(
        entry,
        out_type=out_type,
        grid=grid,
        grid_names=grid_names,
        num_threads=CONSUMERS + 1,
        thread_name="wg",
        compiler_params=compiler_params(not interpret),
        **interpret_params(interpret),
    )


@dataclasses.dataclass(frozen=True)
class Scoped:
    """A kernel's scoped allocations, by name: shared-memory buffers (`smem`; None
    for a buffer the kernel goes without), TMA `barriers` and hand-off `signals`."""

    smem: dict
    barriers: dict
    signals: dict


def run_scoped_warpgroups(
    body: Callable[[Scoped], None], smem: dict, barriers: dict, named: NamedBarriers
) -> None:
    """`body(Scoped(...))` with the buffers `smem` (name: `plgpu.SMEM` or None), the
    TMA `barriers` (name: `plgpu.Barrier`) and the `named` barriers' signals,
    allocated in that order and shared by the kernel's warpgroups (tokamax's
    `_get_scratch_types`: scratch by name, not by position)."""

    def scoped(smem_refs, barrier_refs, mbarriers):
        body(
            Scoped(
                dict(zip(smem, smem_refs)),
                dict(zip(barriers, barrier_refs)),
                named.signals(mbarriers),
            )
        )

    pl.run_scoped(
        scoped,
        list(smem.values()),
        tuple(barriers.values()),
        named.scratch(),
        collective_axes="wg",
    )
