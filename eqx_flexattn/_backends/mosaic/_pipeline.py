"""The pipeline every Mosaic GPU kernel of this package shares: warp specialisation
(two consumer warpgroups and a producer), the producer's TMA ring, the hand-offs
between warpgroups (`Signals`, on hardware named barriers), and the consumers'
batched wgmmas.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu


WG = plgpu.Layout.WGMMA
ROW = plgpu.Layout.WGMMA.reduce(1)  # one value per tile row
COL = plgpu.Layout.WGMMA.reduce(0)  # one value per tile column


def warpgroup_sync(named: bool, barrier_id):
    """A barrier of the 128 threads of one warpgroup (named barrier `barrier_id`);
    a no-op in the interpreter, which runs a warpgroup's code in order."""
    if not named:
        return lambda: None
    return lambda: _named_barrier("sync", barrier_id, 128)


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


FIRST_NAMED_BARRIER = 4  # 0 is the CTA's barrier, 1-3 Mosaic GPU's per warpgroup
NAMED_BARRIERS = 16  # per CTA, on sm90


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
    `first_id`): no shared-memory traffic. The interpreter has none, so there
    `mbarriers` (allocated by `signal_scratch`) stand in.

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
        return 128 * (self.arrivals + self.waiters)

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


def make_signals(named: bool, families, mbarriers) -> list[Signals]:
    """`Signals` for `families = [(n, arrivals, waiters), ...]`: consecutive named
    barrier ids, or the scoped `mbarriers` (one per family, from
    `signal_scratch`)."""
    out, first = [], FIRST_NAMED_BARRIER
    for (n, arrivals, waiters), bars in zip(families, mbarriers):
        if named:
            out.append(Signals(arrivals, waiters, first_id=first))
            first += n
        else:
            out.append(Signals(arrivals, waiters, mbarriers=bars))
    if first > NAMED_BARRIERS:
        raise ValueError(
            f"{first - FIRST_NAMED_BARRIER} named barriers needed, "
            f"{NAMED_BARRIERS - FIRST_NAMED_BARRIER} available"
        )
    return out


def signal_scratch(named: bool, families) -> tuple:
    """The scoped allocations `make_signals` needs (Nones when named)."""
    if named:
        return tuple(None for _ in families)
    return tuple(plgpu.Barrier(num_arrivals=a, num_barriers=n) for n, a, _ in families)


def compiler_params(named: bool) -> plgpu.CompilerParams:
    """The kernels' compiler parameters. With named barriers (the GPU), Pallas's
    conservative automatic warpgroup barriers around shared-memory accesses are off:
    no kernel reads and writes one shared-memory region from the same thread, and
    every store the TMA reads is followed by `commit_smem`."""
    return plgpu.CompilerParams(approx_math=True, unsafe_no_auto_barriers=named)


def produce(fetch, n_all, stages: int, released, steps=0):
    """The producer warpgroup's loop over one block list: `fetch(t, slot)` for
    `t < n_all` into ring slot `(steps + t) % stages`, `steps` being the blocks
    streamed before (a persistent kernel's earlier tiles); a slot is refilled once
    the consumers released it (every `Signals` of `released`)."""

    @pl.loop(jnp.int32(0), n_all)
    def _(t):
        step = steps + t
        slot = lax.rem(step, jnp.int32(stages))

        @pl.when(step >= stages)
        def _():
            for signals in released:
                signals.wait(slot)

        fetch(t, slot)


def drain(total, stages: int, released) -> None:
    """The producer's last act: observe the last release of every slot used by the
    `total` blocks streamed (so each barrier ends in a completed phase)."""
    for i in range(stages):

        @pl.when(i < total)
        def _():
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


def interpret_params(interpret: bool) -> dict:
    """`plgpu.kernel`'s keyword for the Mosaic GPU interpreter, when asked for."""
    return {"interpret": plgpu.InterpretGPUParams()} if interpret else {}


def warp_specialized(entry, out_type, grid, grid_names, interpret: bool):
    """`plgpu.kernel` of three warpgroups (axis "wg": two consumers and a producer)
    on `grid` (axes `grid_names`)."""
    return plgpu.kernel(
        entry,
        out_type=out_type,
        grid=grid,
        grid_names=grid_names,
        num_threads=3,
        thread_name="wg",
        compiler_params=compiler_params(not interpret),
        **interpret_params(interpret),
    )


def run_scoped_warpgroups(body, smem, barriers, named: bool, families) -> None:
    """`body((smem, barriers, signal mbarriers))` with those scoped allocations,
    shared by the kernel's warpgroups (`families`: as for `make_signals`)."""
    pl.run_scoped(
        lambda *scoped: body(scoped),
        smem,
        barriers,
        signal_scratch(named, families),
        collective_axes="wg",
    )
