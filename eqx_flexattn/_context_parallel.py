"""Attention sharded over devices with `shard_map`: batch and head sharding, and
context parallelism over the sequence (a ring of K/V chunks, or an all-gather).

Every device runs an ordinary backend (`xla`, `mosaic`, ...) on its local blocks. The
local problem sees local positions; `_Local` mods translate them to the global
positions (and batch and head indices) the user's mods were written for, so masks
and score mods are the single-device ones, unchanged. Partial results over chunks of
keys are merged exactly with `merge_attention`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

from . import _attention
from ._backends import AbstractBackend, AttentionProblem, select_backend
from ._backends._config import expand_options
from ._block_mask import _INDEX_FIELDS, BlockMask
from ._merge import merge_attention
from ._mods import INDEX_DTYPE


STRATEGIES = ("auto", "ring", "all_gather")
LAYOUTS = ("natural", "balanced")


# ----------------------------------------------------------------------------------
# Layouts


def chunk_order(num_devices: int, layout: str) -> np.ndarray:
    """The chunks of the sequence in the order devices hold them: `natural` gives
    device `i` chunk `i` of `P`; `balanced` gives it chunks `i` and `2P - 1 - i` of
    `2P` (one from the front, one from the back: equal causal work)."""
    if layout == "natural":
        return np.arange(num_devices)
    p = num_devices
    return np.stack([np.arange(p), 2 * p - 1 - np.arange(p)], axis=1).reshape(-1)


def padded_length(length: int, num_chunks: int, unit: int) -> int:
    """`length` rounded up to `num_chunks` chunks of a multiple of `unit`."""
    return math.ceil(length / (num_chunks * unit)) * num_chunks * unit


def permute_chunks(x, order: np.ndarray, axis: int):
    """Splits `axis` into `len(order)` equal chunks and puts chunk `order[j]` at `j`."""
    n = len(order)
    shape = x.shape
    x = x.reshape(*shape[:axis], n, shape[axis] // n, *shape[axis + 1 :])
    x = jnp.take(x, jnp.asarray(order), axis=axis)
    return x.reshape(shape)


# ----------------------------------------------------------------------------------
# Local mods


class _Positions(eqx.Module):
    """Local positions to global ones: the local axis is `len(starts)` segments of
    `size` positions; segment `j` starts at global position `starts[j]`."""

    starts: Any  # int32 (n,), n = 1 or 2
    size: int = eqx.field(static=True)

    def __call__(self, idx):
        if self.starts.shape[0] == 1:
            return idx + self.starts[0]
        first = idx < self.size
        return jnp.where(first, idx + self.starts[0], idx - self.size + self.starts[1])


class _Local(eqx.Module):
    """A mod seen from one device: local indices in, the global mod's result out.

    `length` (the true sequence length) clamps positions in the padding, and a mask
    mod also masks keys in the padding."""

    mod: Callable
    b0: Any  # int32 scalar or None
    h0: Any
    q: _Positions | None
    kv: _Positions | None
    length: int | None = eqx.field(static=True)
    mask: bool = eqx.field(static=True)

    def _indices(self, b, h, q_idx, kv_idx):
        if self.b0 is not None:
            b = b + self.b0
        if self.h0 is not None:
            h = h + self.h0
        if self.q is not None:
            q_idx = self.q(q_idx)
        if self.kv is not None:
            kv_idx = self.kv(kv_idx)
        return b, h, q_idx, kv_idx

    def __call__(self, *args):
        *score, b, h, q_idx, kv_idx = args
        b, h, q_idx, kv_idx = self._indices(b, h, q_idx, kv_idx)
        if self.length is None:
            return self.mod(*score, b, h, q_idx, kv_idx)
        last = self.length - 1
        out = self.mod(
            *score, b, h, jnp.minimum(q_idx, last), jnp.minimum(kv_idx, last)
        )
        return (out & (kv_idx < self.length)) if self.mask else out


def _uses(mod: Callable, mask: bool) -> tuple[bool, bool, bool, bool]:
    """Whether `mod` reads `b`, `h`, `q_idx`, `kv_idx` (conservatively: an index that
    appears in its traced program)."""
    i = jax.ShapeDtypeStruct((), INDEX_DTYPE)
    args = (i,) * 4 if mask else (jax.ShapeDtypeStruct((), jnp.float32), *(i,) * 4)
    jaxpr = jax.make_jaxpr(lambda *a: mod(*a))(*args).jaxpr
    used = {id(v) for e in jaxpr.eqns for v in e.invars}
    used |= {id(v) for v in jaxpr.outvars}
    return tuple(id(v) in used for v in jaxpr.invars[-4:])


# ----------------------------------------------------------------------------------
# The plan: everything static about one sharded call


@dataclasses.dataclass(frozen=True)
class _Plan:
    axis_name: str | None
    batch_axis: str | None
    head_axis: str | None
    ring: int  # devices on the sequence axis (1: no context parallelism)
    strategy: str  # "ring" or "all_gather" (ring == 1: "local")
    layout: str
    length: int  # true sequence length
    padded: int  # padded sequence length
    block_size: tuple[int, int]
    batch_shards: int
    head_shards: int
    scale: float
    enable_gqa: bool
    kernel_options: Any
    backend: str
    # Which indices the mods need translated: (b, h, positions).
    shift_b: bool
    shift_h: bool

    @property
    def chunks_per_device(self) -> int:
        return 2 if self.layout == "balanced" else 1

    @property
    def chunk(self) -> int:
        return self.padded // (self.ring * self.chunks_per_device)

    def chunks_of(self, device):
        """The global chunk indices device `device` (traced int) holds."""
        if self.layout == "natural":
            return (device,)
        return (device, 2 * self.ring - 1 - device)


def _positions(plan: _Plan, device) -> _Positions:
    starts = jnp.stack([c * plan.chunk for c in plan.chunks_of(device)])
    return _Positions(starts.astype(INDEX_DTYPE), plan.chunk)


def _offsets(plan: _Plan, b_local: int, h_local: int):
    b0 = h0 = None
    if plan.shift_b:
        b0 = (jax.lax.axis_index(plan.batch_axis) * b_local).astype(INDEX_DTYPE)
    if plan.shift_h:
        h0 = (jax.lax.axis_index(plan.head_axis) * h_local).astype(INDEX_DTYPE)
    return b0, h0


def _local_mods(plan, smod, mmod, b0, h0, q_pos, kv_pos):
    """The score and mask mods of a local problem (the global ones when nothing needs
    translating)."""
    length = None if plan.strategy == "local" else plan.length

    def wrap(mod, mask):
        if mod is None or (b0 is None and h0 is None and q_pos is None):
            return mod
        return _Local(mod, b0, h0, q_pos, kv_pos, length, mask)

    return wrap(smod, False), wrap(mmod, True)


def _problem(plan: _Plan, q, k, v, score_mod, block_mask) -> AttentionProblem:
    return _attention._problem(
        q,
        k,
        v,
        score_mod,
        block_mask,
        plan.scale,
        plan.enable_gqa,
        expand_options(plan.kernel_options),
    )


def _run(impl: AbstractBackend, problem: AttentionProblem):
    if impl.differentiable:
        return impl.forward(problem)
    return _attention._fused(problem, impl)


# ----------------------------------------------------------------------------------
# Per device: no sequence axis (batch / head sharding)


def _local_attention(plan: _Plan, q, k, v, smod, bm: BlockMask):
    b0, h0 = _offsets(plan, q.shape[0], q.shape[1])
    score, _ = _local_mods(plan, smod, None, b0, h0, None, None)
    if b0 is not None or h0 is not None:
        mask = _Local(bm.mask_mod, b0, h0, None, None, None, True)
        bm = BlockMask(
            *(getattr(bm, n) for n in _INDEX_FIELDS),
            block_size=bm.block_size,
            seq_lengths=bm.seq_lengths,
            mask_mod=mask,
        )
    problem = _problem(plan, q, k, v, score, bm)
    impl, _ = select_backend(plan.backend, problem)
    return _run(impl, problem)


# ----------------------------------------------------------------------------------
# Per device: context parallelism


class _Shard(eqx.Module):
    """What one device holds besides q, k, v and the score mod: the global mask mod
    (as a `ScalarMod`) and its rows of the block states `(B', H', M_local, N)`."""

    mask_mod: Callable
    partial: Any
    full: Any


def _columns(plan: _Plan, states, device):
    """The block-state columns of the key chunks device `device` holds."""
    width = plan.chunk // plan.block_size[1]
    cols = [
        jax.lax.dynamic_slice_in_dim(states, c * width, width, axis=-1)
        for c in plan.chunks_of(device)
    ]
    return cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=-1)


def _step_problem(plan, q, k, v, smod, shard: _Shard, source, partial, full):
    """The local problem of this device's queries against the keys `k`, `v` of
    device `source` (`None`: keys of the whole sequence, in natural order)."""
    b0, h0 = _offsets(plan, q.shape[0], q.shape[1])
    me = jax.lax.axis_index(plan.axis_name)
    q_pos = _positions(plan, me)
    if source is None:
        kv_pos = _Positions(jnp.zeros((1,), INDEX_DTYPE), plan.padded)
    else:
        kv_pos = _positions(plan, source)
    score, mask = _local_mods(plan, smod, shard.mask_mod, b0, h0, q_pos, kv_pos)
    bm = BlockMask._from_dense(
        partial, full, plan.block_size, (q.shape[2], k.shape[2]), mask
    )
    return _problem(plan, q, k, v, score, bm)


def _ring_perm(plan: _Plan):
    return [(j, (j + 1) % plan.ring) for j in range(plan.ring)]


def _source(plan: _Plan, step):
    return (jax.lax.axis_index(plan.axis_name) - step) % plan.ring


def _select(plan, q, k, v, smod, shard):
    """The backend for the local blocks (chosen once, on the first step's problem)."""
    partial = _columns(plan, shard.partial, 0)
    full = _columns(plan, shard.full, 0)
    problem = _step_problem(plan, q, k, v, smod, shard, 0, partial, full)
    return select_backend(plan.backend, problem)[0]


def _empty(q, v):
    b, h, lq = q.shape[:3]
    acc = _attention.accumulator_dtype(q.dtype)
    return jnp.zeros((b, h, lq, v.shape[-1]), acc), jnp.full((b, h, lq), -jnp.inf, acc)


def _ring_forward(plan, impl, q, k, v, smod, shard):
    """Ring attention, forward: K/V chunks travel one device per step, the transfer
    of the next chunk issued before this step's blocks so that the two overlap;
    chunks with no block to compute are skipped; partial results merge exactly.
    Steps `0 .. P-2` run in a loop (one compiled step however long the ring), the
    last one after it (it sends nothing on)."""
    perm = _ring_perm(plan)

    def attend(step, k, v, out, lse):
        source = _source(plan, step)
        partial = _columns(plan, shard.partial, source)
        full = _columns(plan, shard.full, source)

        def compute(k, v, partial, full):
            problem = _step_problem(plan, q, k, v, smod, shard, source, partial, full)
            o, part_lse = _run(impl, problem)
            return o.astype(out.dtype), part_lse.astype(lse.dtype)

        active = jnp.any(partial | full)
        o, part_lse = jax.lax.cond(
            active, compute, lambda *_: _empty(q, v), k, v, partial, full
        )
        return merge_attention(jnp.stack([out, o]), jnp.stack([lse, part_lse]))

    def step(i, carry):
        k, v, out, lse = carry
        k_next, v_next = jax.lax.ppermute((k, v), plan.axis_name, perm)
        out, lse = attend(i, k, v, out, lse)
        return k_next, v_next, out, lse

    out, lse = _empty(q, v)
    k, v, out, lse = jax.lax.fori_loop(0, plan.ring - 1, step, (k, v, out, lse))
    out, lse = attend(plan.ring - 1, k, v, out, lse)
    return out.astype(q.dtype), lse


@eqx.filter_custom_vjp
def _ring(diff, plan, impl, shard):
    q, k, v, smod = diff
    return _ring_forward(plan, impl, q, k, v, smod, shard)


@_ring.def_fwd
def _ring_fwd(perturbed, diff, plan, impl, shard):
    del perturbed
    q, k, v, smod = diff
    out, lse = _ring_forward(plan, impl, q, k, v, smod, shard)
    return (out, lse), (out, lse)


def _zeros_for(tree):
    return jax.tree_util.tree_map(
        lambda x: jnp.zeros(x.shape, x.dtype) if eqx.is_inexact_array(x) else None,
        tree,
    )


def _fill(grads, like):
    """`grads` with `None` replaced by zeros wherever `like` has an inexact array."""
    return jax.tree_util.tree_map(
        lambda g, x: (
            (jnp.zeros(x.shape, x.dtype) if g is None else g.astype(x.dtype))
            if eqx.is_inexact_array(x)
            else None
        ),
        grads,
        like,
        is_leaf=lambda g: g is None,
    )


@_ring.def_bwd
def _ring_bwd(residuals, grads, perturbed, diff, plan, impl, shard):
    """The reverse ring: K/V travel as in the forward pass (the next chunk fetched
    while this one computes), and the partial dK/dV of a chunk travel behind it,
    each device adding its contribution (that transfer overlaps the next step's
    blocks); one last hop brings dK/dV home. A step's gradients come from the
    backend's fused backward pass given the merged (out, lse): exactly that step's
    share. Score-mod parameter gradients stay per-device partials, summed over
    devices by `shard_map` (a `psum`)."""
    del perturbed
    out, lse = residuals
    dout, dlse = grads
    q, k, v, smod = diff
    dout = jnp.zeros_like(out) if dout is None else dout
    dlse = jnp.zeros_like(lse) if dlse is None else dlse
    perm = _ring_perm(plan)
    acc = lse.dtype
    send = lambda x: jax.lax.ppermute(x, plan.axis_name, perm)

    def grads_of(step, k, v):
        source = _source(plan, step)
        partial = _columns(plan, shard.partial, source)
        full = _columns(plan, shard.full, source)

        def compute(k, v, partial, full):
            build = lambda d: _step_problem(plan, *d, shard, source, partial, full)
            problem, pull = eqx.filter_vjp(build, (q, k, v, smod))
            want = jax.tree_util.tree_map(eqx.is_inexact_array, problem)
            g = impl.backward(problem, out, lse, dout, dlse, want)
            gq, gk, gv, gm = pull(_fill(g, problem))[0]
            return _wide((gq, gk, gv, _fill(gm, smod)), acc)

        def skip(k, v, partial, full):
            return _wide(_zeros_for((q, k, v, smod)), acc)

        active = jnp.any(partial | full)
        return jax.lax.cond(active, compute, skip, k, v, partial, full)

    add = lambda a, b: jax.tree_util.tree_map(jnp.add, a, b)

    def step(i, carry, prefetch=True):
        k, v, k_next, v_next, dk, dv, dq, dmod = carry
        k, v = k_next, v_next  # the chunk of step i, fetched during step i - 1
        if prefetch:
            k_next, v_next = send((k, v))
        dk, dv = send((dk, dv))  # this chunk's dK/dV so far, from the device before
        gq, gk, gv, gm = grads_of(i, k, v)
        return k, v, k_next, v_next, dk + gk, dv + gv, dq + gq, add(dmod, gm)

    k_next, v_next = send((k, v)) if plan.ring > 1 else (k, v)
    dq, dk, dv, dmod = grads_of(0, k, v)
    carry = (k, v, k_next, v_next, dk, dv, dq, dmod)
    if plan.ring > 2:
        carry = jax.lax.fori_loop(1, plan.ring - 1, step, carry)
    if plan.ring > 1:
        carry = step(plan.ring - 1, carry, prefetch=False)
        *_, dk, dv, dq, dmod = carry
        dk, dv = send((dk, dv))  # home
    dmod = jax.tree_util.tree_map(
        lambda g, p: g.astype(p.dtype), dmod, _zeros_for(smod)
    )
    return (q_like(dq, q), q_like(dk, k), q_like(dv, v), dmod)


def _wide(tree, acc):
    """Gradients accumulated in the accumulator dtype (or wider)."""
    return jax.tree_util.tree_map(
        lambda g: g.astype(jnp.promote_types(g.dtype, acc)), tree
    )


def q_like(g, x):
    return g.astype(x.dtype)


def _gather_forward(plan, impl, q, k, v, smod, shard):
    """All-gather K/V: one collective, then this device's queries against the whole
    sequence (its gradient is a reduce-scatter of dK/dV, by autodiff)."""
    k, v = (jax.lax.all_gather(x, plan.axis_name, axis=2, tiled=True) for x in (k, v))
    if plan.layout == "balanced":  # device order -> natural order
        inverse = np.argsort(chunk_order(plan.ring, plan.layout))
        k, v = (permute_chunks(x, inverse, axis=2) for x in (k, v))
    problem = _step_problem(plan, q, k, v, smod, shard, None, shard.partial, shard.full)
    return _run(impl, problem)


def _context_parallel(plan, q, k, v, smod, shard):
    impl = _select(plan, q, k, v, smod, shard)
    if plan.strategy == "all_gather":
        return _gather_forward(plan, impl, q, k, v, smod, shard)
    if impl.differentiable:  # the dense reference: autodiff through the ring
        return _ring_forward(plan, impl, q, k, v, smod, shard)
    return _ring((q, k, v, smod), plan, impl, shard)


# ----------------------------------------------------------------------------------
# The global call


def _mesh_axis(mesh, name: str | None, what: str) -> int:
    if name is None:
        return 1
    if not isinstance(name, str):
        raise TypeError(
            f"`{what}` must be a mesh axis name (str) or None, got {name!r}."
        )
    if name not in mesh.shape:
        raise ValueError(
            f"`{what}`={name!r} is not an axis of the mesh (axes: {tuple(mesh.shape)})."
        )
    return mesh.shape[name]


def choose_strategy(ring: int, hq: int, hkv: int) -> str:
    """The rule of `strategy="auto"`: `"all_gather"` when the ring has at most 2
    devices (one transfer: nothing to overlap) or when the whole sequence's K/V is no
    larger than the local queries (`ring <= hq // hkv`: GQA with few key/value
    heads), else `"ring"`."""
    if ring <= 2 or ring <= hq // hkv:
        return "all_gather"
    return "ring"


def _explicit(mesh) -> bool:
    """Whether `mesh` has `Explicit` axes (`jax.make_mesh`'s default): its arrays
    carry their sharding in their type, and `shard_map` takes only arrays already
    sharded as its `in_specs` say."""
    types = getattr(mesh, "axis_types", ())
    return any("Explicit" in str(t) for t in types)


def _place(tree, specs, mesh):
    """`tree`'s arrays resharded to `specs` (a matching tree of `PartitionSpec`s)
    on an explicit mesh; unchanged on an `Auto` one (`shard_map` moves them)."""
    if not _explicit(mesh):
        return tree
    return jax.tree_util.tree_map(
        lambda x, spec: jax.sharding.reshard(x, NamedSharding(mesh, spec)),
        tree,
        specs,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def _shard_mapped(body, mesh, args, in_specs, out_specs):
    """`body(*args)` per device under `shard_map`, the arguments placed as
    `in_specs` say first (see `_place`)."""
    fn = jax.shard_map(
        body, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False
    )
    return fn(*_place(args, in_specs, mesh))


def sharded_attention(
    query,
    key,
    value,
    score_mod,
    block_mask,
    *,
    mesh,
    axis_name,
    batch_axis,
    head_axis,
    scale,
    enable_gqa,
    return_lse,
    backend,
    kernel_options,
    strategy,
    layout,
):
    """The implementation of `context_parallel.flex_attention` (see there)."""
    if not isinstance(mesh, Mesh | AbstractMesh):
        raise TypeError(
            f"`mesh` must be a jax.sharding.Mesh, got {type(mesh).__name__}."
        )
    if strategy not in STRATEGIES:
        raise ValueError(f"`strategy` must be one of {STRATEGIES}, got {strategy!r}.")
    if layout not in LAYOUTS:
        raise ValueError(f"`layout` must be one of {LAYOUTS}, got {layout!r}.")
    enable_gqa = _attention._check_flag("enable_gqa", enable_gqa)
    return_lse = _attention._check_flag("return_lse", return_lse)
    ring = _mesh_axis(mesh, axis_name, "axis_name")
    nb = _mesh_axis(mesh, batch_axis, "batch_axis")
    nh = _mesh_axis(mesh, head_axis, "head_axis")
    names = [n for n in (axis_name, batch_axis, head_axis) if n is not None]
    if len(set(names)) != len(names):
        raise ValueError(
            f"`axis_name`, `batch_axis` and `head_axis` must be different mesh axes, "
            f"got {axis_name!r}, {batch_axis!r}, {head_axis!r}."
        )
    q = _attention._check_array("query", query)
    k = _attention._check_array("key", key)
    v = _attention._check_array("value", value)
    seq = q.shape[2]
    if layout == "balanced":
        if block_mask is None:
            raise ValueError(
                "layout='balanced' needs a `block_mask` (built for the true, natural "
                "sequence length; `create_block_mask(noop_mask, None, None, L, L)` for "
                "full attention): it says how long the sequence is."
            )
        seq = block_mask.seq_lengths[0]
        if axis_name is None:
            raise ValueError("layout='balanced' needs `axis_name` (a sequence axis).")
    if axis_name is not None and k.shape[2] != q.shape[2]:
        raise ValueError(
            "context_parallel.flex_attention is self-attention over one sequence: "
            f"query and key must have the same length, got Lq={q.shape[2]} and "
            f"Lkv={k.shape[2]}."
        )
    # The single-device checks, and the mods converted, on the natural shapes.
    view = lambda x: x[:, :, :seq]
    problem = _attention._problem(
        view(q),
        view(k),
        view(v),
        score_mod,
        block_mask,
        scale,
        enable_gqa,
        kernel_options,
    )
    _, array_scale = _attention._check_scale(scale, q.shape[-1])
    if array_scale is not None:
        acc = problem.acc_dtype
        q = (q.astype(acc) * array_scale.astype(acc)).astype(q.dtype)
    b, hq, _, _ = q.shape
    hkv = k.shape[1]
    for n, size, what in (
        (nb, b, "batch size B"),
        (nh, hq, "query heads Hq"),
        (nh, hkv, "key/value heads Hkv"),
    ):
        if size % n:
            raise ValueError(
                f"The {what}={size} must be a multiple of the mesh axis it is sharded "
                f"over ({n} devices)."
            )
    bm = problem.block_mask
    smod, mmod = problem.score_mod, problem.mask_mod
    uses = [
        (False,) * 4 if m is None else _uses(m, mask)
        for m, mask in ((smod, False), (mmod, True))
    ]
    plan_kw = dict(
        axis_name=axis_name,
        batch_axis=batch_axis,
        head_axis=head_axis,
        ring=ring,
        layout=layout,
        length=seq,
        block_size=bm.block_size,
        batch_shards=nb,
        head_shards=nh,
        scale=problem.scale,
        enable_gqa=enable_gqa,
        kernel_options=problem.kernel_options,
        backend=backend,
        shift_b=nb > 1 and any(u[0] for u in uses),
        shift_h=nh > 1 and any(u[1] for u in uses),
    )
    bspec, hspec = batch_axis, head_axis
    qspec = PartitionSpec(bspec, hspec, axis_name, None)
    rep = lambda tree: jax.tree_util.tree_map(lambda _: PartitionSpec(), tree)
    mb, mh = bm.kv_num_blocks.shape[:2]
    bmspec = (
        bspec if mb == b and mb > 1 else None,
        hspec if mh == hq and mh > 1 else None,
    )

    # One device on the sequence axis runs the single-device call, unless a strategy
    # (or layout) asks for the context-parallel machinery: a ring of one.
    if ring == 1 and strategy == "auto" and layout == "natural":
        plan = _Plan(strategy="local", padded=seq, **plan_kw)
        arrays, static = eqx.partition(bm, eqx.is_array)
        bm_specs = jax.tree_util.tree_map(lambda _: PartitionSpec(*bmspec), arrays)
        bm_specs = eqx.tree_at(
            lambda t: t.mask_arrays,
            bm_specs,
            rep(arrays.mask_arrays),
            is_leaf=lambda x: x is None,
        )

        smod_arrays, smod_static = eqx.partition(smod, eqx.is_array)

        def body(q, k, v, smod_arrays, arrays):
            smod = eqx.combine(smod_arrays, smod_static)
            return _local_attention(plan, q, k, v, smod, eqx.combine(arrays, static))

        out, lse = _shard_mapped(
            body,
            mesh,
            (q, k, v, smod_arrays, arrays),
            (qspec, qspec, qspec, rep(smod_arrays), bm_specs),
            (qspec, PartitionSpec(bspec, hspec, None)),
        )
        return (out, lse) if return_lse else out

    if strategy == "auto":
        strategy = choose_strategy(ring, hq, hkv)
    chunks = ring * (2 if layout == "balanced" else 1)
    unit = math.lcm(*bm.block_size)
    if layout == "balanced":
        padded = q.shape[2]
        if padded % chunks or (padded // chunks) % unit or padded < seq:
            raise ValueError(
                f"layout='balanced': the inputs have length {padded}, which is not "
                f"{chunks} chunks of a multiple of the block size {unit} covering the "
                f"block mask's length {seq}. Permute them with `to_balanced(x, "
                f"{ring}, block_size={unit})`."
            )
    else:
        padded = padded_length(seq, chunks, unit)
        pad = [(0, 0), (0, 0), (0, padded - seq), (0, 0)]
        if padded != seq:
            whole = PartitionSpec(bspec, hspec, None, None)
            q, k, v = _place((q, k, v), (whole,) * 3, mesh)
            q, k, v = (jnp.pad(x, pad) for x in (q, k, v))
    plan = _Plan(strategy=strategy, padded=padded, **plan_kw)
    partial, full = _padded_states(bm, plan)
    order = chunk_order(ring, layout)
    partial, full = (permute_chunks(x, order, axis=2) for x in (partial, full))
    statespec = PartitionSpec(*bmspec, axis_name, None)
    (smod_arrays, shard_arrays), static = eqx.partition(
        (smod, _Shard(mmod, partial, full)), eqx.is_array
    )
    shard_specs = eqx.tree_at(
        lambda s: (s.partial, s.full), rep(shard_arrays), (statespec, statespec)
    )

    def body(q, k, v, smod_arrays, shard_arrays):
        smod, shard = eqx.combine((smod_arrays, shard_arrays), static)
        return _context_parallel(plan, q, k, v, smod, shard)

    out, lse = _shard_mapped(
        body,
        mesh,
        (q, k, v, smod_arrays, shard_arrays),
        (qspec, qspec, qspec, rep(smod_arrays), shard_specs),
        (qspec, PartitionSpec(bspec, hspec, axis_name)),
    )
    if layout == "natural":
        if padded != seq:
            specs = (
                PartitionSpec(bspec, hspec, None, None),
                PartitionSpec(bspec, hspec),
            )
            out, lse = _place((out, lse), specs, mesh)
            out, lse = out[:, :, :seq], lse[:, :, :seq]
    return (out, lse) if return_lse else out


def _padded_states(bm: BlockMask, plan: _Plan):
    """The block states of `bm` over the padded length: blocks past the end are
    absent, and a full block holding padded keys becomes partial (the local mask mod
    masks the padding)."""
    # No index check: it would be a host callback inside the compiled call.
    partial, full = bm._states(check=False)
    bq, bkv = plan.block_size
    mq, nkv = plan.padded // bq, plan.padded // bkv
    grow = lambda x: jnp.pad(
        x, [(0, 0), (0, 0), (0, mq - x.shape[2]), (0, nkv - x.shape[3])]
    )
    partial, full = grow(partial), grow(full)
    ragged = (np.arange(nkv) + 1) * bkv > plan.length  # key blocks with padding
    partial = partial | (full & ragged)
    full = full & ~ragged
    return partial, full


def ring_schedule(
    block_mask: BlockMask, num_devices: int, layout: str = "natural"
) -> np.ndarray:
    """Which ring steps compute: a bool array `(num_devices, num_devices)`, True where
    device `i` at step `s` (holding the keys of device `(i - s) % P`) has a block to
    compute; the ring skips the others. Needs a concrete block mask."""
    unit = math.lcm(*block_mask.block_size)
    chunks = num_devices * (2 if layout == "balanced" else 1)
    length = block_mask.seq_lengths[0]
    plan = _Plan(
        axis_name=None,
        batch_axis=None,
        head_axis=None,
        ring=num_devices,
        strategy="ring",
        layout=layout,
        length=length,
        padded=padded_length(length, chunks, unit),
        block_size=block_mask.block_size,
        batch_shards=1,
        head_shards=1,
        scale=1.0,
        enable_gqa=False,
        kernel_options=(),
        backend="auto",
        shift_b=False,
        shift_h=False,
    )
    partial, full = _padded_states(block_mask, plan)
    some = np.asarray(jnp.any(partial | full, axis=(0, 1)))  # (Mq, N)
    rows = plan.chunk // plan.block_size[0]
    schedule = np.zeros((num_devices, num_devices), bool)
    for i in range(num_devices):
        mine = np.concatenate(
            [some[c * rows : (c + 1) * rows] for c in plan.chunks_of(i)]
        )
        for s in range(num_devices):
            schedule[i, s] = _columns(
                plan, jnp.asarray(mine), (i - s) % num_devices
            ).any()
    return schedule
