"""Kernel backends under `jax.jit` with q, k and v sharded over batch and heads on
`Auto` mesh axes (`NamedSharding` inputs): a `custom_partitioning` rule, so that each
device runs the kernel on its own shard.

A `pallas_call` has no partitioning rule: XLA would gather q, k and v onto every
device and run the whole attention on each. Here a kernel backend's forward and
backward passes are each wrapped in `custom_partitioning`:

- q, k, v (and out, lse and their cotangents) keep their batch and head sharding; a
  sharding of the sequence or head dimension is gathered (sharding the sequence is
  `eqx_flexattn.context_parallel`'s work). Heads are sharded only where the key/value
  heads divide like the query heads (GQA groups stay on one device).
- The block mask's index arrays shard with the batch and heads where they have them
  (`B` and `Hq` rather than 1); the mods' own arrays are replicated.
- Mods that read `b` or `h` must see the global index. The call takes two extra
  operands, `arange(B)` and `arange(Hq)`, sharded like the batch and the heads; on a
  shard their first elements are its first global batch and head index, and the
  mods are converted afresh to add them (`_Shifted`), their parameter gradients
  mapped back by autodiff of that conversion.
- Score-mod parameter gradients are per-shard partial sums, `psum`med over the batch
  and head axes.

On one device, or inside `shard_map`, `custom_partitioning` runs the function as it
is. It has no batching rule: under `vmap` (how Equinox layers see a batch) the call
is vmapped as usual and that is wrapped again, run per shard of the mapped axis.
`Explicit` mesh axes take `shard_map` instead (`_context_parallel.sharded_attention`).
"""

from __future__ import annotations

import math
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.custom_batching import custom_vmap
from jax.experimental.custom_partitioning import (
    ArrayMapping,
    custom_partitioning,
    SdyShardingRule,
)
from jax.sharding import NamedSharding, PartitionSpec

from ._backends import AbstractBackend, AttentionProblem
from ._backends._base import grads_like
from ._block_mask import _INDEX_FIELDS
from ._mods import _program, convert_mask_mod, convert_score_mod, INDEX_DTYPE, ScalarMod


# ----------------------------------------------------------------------------------
# When: inputs whose type names a mesh of several devices with `Auto` axes


def auto_mesh(problem: AttentionProblem):
    """The abstract mesh of q's sharding when it has several devices and `Auto`
    axes (under `jit` with `NamedSharding` inputs, or inside `jax.set_mesh`), else
    `None`."""
    typeof = getattr(jax, "typeof", None)
    if typeof is None:
        return None
    mesh = getattr(getattr(typeof(problem.q), "sharding", None), "mesh", None)
    if mesh is None or mesh.empty or mesh.size == 1:
        return None
    if not any("Auto" in str(t) for t in getattr(mesh, "axis_types", ())):
        return None
    return mesh


# ----------------------------------------------------------------------------------
# Global batch and head indices for mods on a shard


class _Shifted(eqx.Module):
    """`mod` seeing `b + b0` and `h + h0`."""

    mod: ScalarMod
    b0: Any
    h0: Any

    def __call__(self, *args):
        *score, b, h, q_idx, kv_idx = args
        return self.mod(*score, b + self.b0, h + self.h0, q_idx, kv_idx)


def _reads_batch_or_head(mod: ScalarMod) -> bool:
    program, _ = _program(mod)
    b, h = program.invars[-4], program.invars[-3]
    used = {id(v) for e in program.eqns for v in e.invars}
    used |= {id(v) for v in program.outvars}
    return id(b) in used or id(h) in used


def _offset(mod: ScalarMod | None, b0, h0):
    """`(mod seeing b + b0 and h + h0, pullback)`: `pullback` maps the new mod's
    gradient tree to `mod`'s (through JAX autodiff of the conversion, which only
    moves arrays). `(mod, identity)` when it reads neither index."""
    if mod is None or not _reads_batch_or_head(mod):
        return mod, lambda g: g

    def convert(mod):
        shifted = _Shifted(mod, b0, h0)
        if mod.score_dtype is None:
            return convert_mask_mod(shifted)
        return convert_score_mod(shifted, mod.score_dtype)

    new, vjp = eqx.filter_vjp(convert, mod)

    def pullback(g):
        if g is None:
            return None
        like = eqx.filter(new, eqx.is_inexact_array)
        g = jax.tree.map(
            lambda x, d: None if x is None else jnp.zeros_like(x) if d is None else d,
            like,
            g,
            is_leaf=lambda x: x is None,
        )
        (out,) = vjp(g)
        return out

    return new, pullback


def _with_offsets(problem: AttentionProblem, b0, h0):
    """`problem` with its mods seeing global batch and head indices, and the map
    of its score mod's gradient tree back to the given one's."""
    score, pullback = _offset(problem.score_mod, b0, h0)
    mask, _ = _offset(problem.mask_mod, b0, h0)
    problem = eqx.tree_at(
        lambda p: (p.score_mod, p.mask_mod),
        problem,
        (score, mask),
        is_leaf=lambda x: x is None,
    )
    return problem, pullback


# ----------------------------------------------------------------------------------
# Which operand shards how


_Q, _KV, _BATCH_IDS, _HEAD_IDS, _BLOCKS, _REPLICATED = range(6)


def _roles(arrays) -> list[int]:
    """Per leaf of `arrays` (a problem's array part): how it is sharded."""
    roles = jax.tree.map(lambda _: _REPLICATED, arrays)
    fields = [lambda p: p.q, lambda p: p.k, lambda p: p.v]
    values = [_Q, _KV, _KV]
    for name in _INDEX_FIELDS:
        fields.append(lambda p, name=name: getattr(p.block_mask, name))
        values.append(_BLOCKS)
    for get, value in zip(fields, values):
        roles = eqx.tree_at(get, roles, value)
    return jax.tree.leaves(roles)


def _axis_size(mesh, axis) -> int:
    names = axis if isinstance(axis, tuple) else (axis,)
    return math.prod(mesh.shape[n] for n in names)


class _Layout(eqx.Module):
    """The mesh axes (or `None`) the batch and the heads are sharded over: q's,
    where they divide the batch and both kinds of heads."""

    batch: Any
    heads: Any

    @classmethod
    def of(cls, mesh, q_sharding, q_shape, hkv: int) -> _Layout:
        spec = (None, None)
        if isinstance(q_sharding, NamedSharding):
            spec = (*tuple(q_sharding.spec), None, None)[:2]
        batch, heads = spec
        b, hq = q_shape[:2]
        if batch is not None and b % _axis_size(mesh, batch):
            batch = None
        if heads is not None:
            n = _axis_size(mesh, heads)
            if hq % n or hkv % n:
                heads = None
        return cls(batch, heads)

    @property
    def axes(self) -> tuple:
        out = []
        for axis in (self.batch, self.heads):
            if axis is not None:
                out += list(axis) if isinstance(axis, tuple) else [axis]
        return tuple(out)

    def spec(self, role: int, shape, b: int, hq: int) -> PartitionSpec:
        rest = (None,) * max(len(shape) - 2, 0)
        if role in (_Q, _KV):
            return PartitionSpec(self.batch, self.heads, *rest)
        if role == _BATCH_IDS:
            return PartitionSpec(self.batch)
        if role == _HEAD_IDS:
            return PartitionSpec(self.heads)
        if role == _BLOCKS:
            return PartitionSpec(
                self.batch if shape[0] == b and b > 1 else None,
                self.heads if shape[1] == hq and hq > 1 else None,
                *rest,
            )
        return PartitionSpec()


# ----------------------------------------------------------------------------------
# The wrapped calls


def _rule(shapes, roles, out_dims, results) -> SdyShardingRule:
    """Shardy's rule: q-like and k-like arrays (operands and results) share the
    batch factor, q-like ones the head and query-position factors, k-like ones
    theirs; every other dimension is a factor of its own (the partition callback
    decides the shardings)."""
    names = {_Q: ("b", "h", "i"), _KV: ("b", "g", "j")}

    def mapping(prefix, n, ndim, role):
        dims = [f"{prefix}{n}_{i}" for i in range(ndim)]
        if role in names and ndim >= 3:
            dims[:3] = names[role]
        return ArrayMapping(*dims)

    pairs = enumerate(zip(shapes, roles))
    operands = [mapping("x", n, len(s), r) for n, (s, r) in pairs]
    pairs = enumerate(zip(out_dims, results))
    return SdyShardingRule(
        tuple(operands), tuple(mapping("y", n, d, r) for n, (d, r) in pairs)
    )


def _partitioned(plain, problem, extra, extra_roles, result_roles):
    """`plain(problem, unwrap, *extra)`, per shard of batch and heads.

    `plain` gets the shard's problem (its mods seeing global indices) and `unwrap`,
    the map from its score mod's gradient tree to the given one's. `extra` are
    further arrays (out, lse, cotangents) with their roles; `result_roles` says how
    each result is sharded (`_Q`, `_KV`, or `_REPLICATED`: a parameter gradient,
    `psum`med over the batch and head axes)."""
    arrays, static = eqx.partition(problem, eqx.is_array)
    leaves, treedef = jax.tree.flatten(arrays)
    b, hq = problem.q.shape[:2]
    hkv = problem.k.shape[1]
    ids = (jnp.arange(b, dtype=INDEX_DTYPE), jnp.arange(hq, dtype=INDEX_DTYPE))
    roles = [*_roles(arrays), _BATCH_IDS, _HEAD_IDS, *extra_roles]
    n = len(leaves)

    def run(flat, layout):
        p = eqx.combine(jax.tree.unflatten(treedef, flat[:n]), static)
        unwrap = lambda g: g
        if layout is not None and layout.axes:  # a shard: global indices
            p, unwrap = _with_offsets(p, flat[n][0], flat[n + 1][0])
        outs = plain(p, unwrap, *flat[n + 2 :])
        if layout is not None and layout.axes:
            outs = [
                jax.lax.psum(o, layout.axes) if r == _REPLICATED else o
                for o, r in zip(outs, result_roles)
            ]
        return tuple(outs)

    def shardings(mesh, arg_shapes):
        layout = _Layout.of(mesh, arg_shapes[0].sharding, arg_shapes[0].shape, hkv)
        spec = lambda role, shape: NamedSharding(mesh, layout.spec(role, shape, b, hq))
        args = tuple(spec(r, a.shape) for r, a in zip(roles, arg_shapes))
        return layout, args, spec

    def infer(mesh, arg_shapes, result_shape):
        _, _, spec = shardings(mesh, arg_shapes)
        return tuple(spec(r, s.shape) for r, s in zip(result_roles, result_shape))

    def partition(mesh, arg_shapes, result_shape):
        layout, args, spec = shardings(mesh, arg_shapes)
        outs = tuple(spec(r, s.shape) for r, s in zip(result_roles, result_shape))
        return mesh, lambda *flat: run(flat, layout), outs, args

    flat = (*leaves, *ids, *extra)
    whole = lambda *flat: run(flat, None)  # one device: custom_partitioning inlines it
    call = custom_partitioning(whole)
    call.def_partition(
        infer_sharding_from_operands=infer,
        partition=partition,
        # A callable: the results' ranks come with the lowering (no extra trace).
        sharding_rule=lambda mesh, operands, results: _rule(
            [o.shape for o in operands],
            roles,
            [len(r.shape) for r in results],
            result_roles,
        ),
    )
    return _with_vmap_rule(call, whole)(*flat)


def _with_vmap_rule(call, whole):
    """`call` (a `custom_partitioning` function, which has no batching rule) under
    `vmap`: `whole` vmapped, itself run per shard of the mapped axis."""
    batchable = custom_vmap(lambda *flat: call(*flat))

    @batchable.def_vmap
    def _(axis_size, in_batched, *flat):
        mapped = jax.vmap(whole, in_axes=[0 if b else None for b in in_batched])
        outs = _per_example_shard(mapped, flat, in_batched)
        return outs, (True,) * len(outs)

    return batchable


def _per_example_shard(mapped, flat, batched):
    """`mapped(*flat)`, a `vmap`ped call (the operands flagged in `batched` and every
    result have the mapped axis first), on each device's shard of the mapped axis
    (as q's is sharded): each device maps over its own examples. This is how
    Equinox layers (`MultiheadFlexAttention` under `jax.vmap`) keep a sharded batch
    local."""
    first = batched.index(True)
    size = jnp.shape(flat[first])[0]

    def axis(mesh, arg_shapes):
        sharding = arg_shapes[first].sharding
        spec = tuple(getattr(sharding, "spec", ()))
        ax = spec[0] if spec else None
        if ax is not None and size % _axis_size(mesh, ax):
            return None
        return ax

    def shardings(mesh, arg_shapes, result_shape):
        ax = axis(mesh, arg_shapes)
        args = tuple(
            NamedSharding(mesh, PartitionSpec(ax) if b else PartitionSpec())
            for b in batched
        )
        return args, tuple(NamedSharding(mesh, PartitionSpec(ax)) for _ in result_shape)

    def infer(mesh, arg_shapes, result_shape):
        return shardings(mesh, arg_shapes, result_shape)[1]

    def partition(mesh, arg_shapes, result_shape):
        args, outs = shardings(mesh, arg_shapes, result_shape)
        return mesh, mapped, outs, args

    def dims(prefix, n, ndim, mapped_first):
        names = [f"{prefix}{n}_{i}" for i in range(ndim)]
        if mapped_first:
            names[0] = "n"
        return ArrayMapping(*names)

    def rule(mesh, operands, results):  # ranks from the lowering: no extra trace
        return SdyShardingRule(
            tuple(
                dims("x", i, len(o.shape), b)
                for i, (o, b) in enumerate(zip(operands, batched))
            ),
            tuple(dims("y", i, len(r.shape), True) for i, r in enumerate(results)),
        )

    call = custom_partitioning(lambda *flat: mapped(*flat))
    call.def_partition(
        infer_sharding_from_operands=infer, partition=partition, sharding_rule=rule
    )
    return _with_vmap_rule(call, mapped)(*flat)


def forward(backend: AbstractBackend, problem: AttentionProblem):
    """`backend.forward(problem)`, per shard of batch and heads (see the module)."""
    if not backend.runs_per_shard or auto_mesh(problem) is None:
        return backend.forward(problem)
    out, lse = _partitioned(
        lambda p, unwrap: backend.forward(p), problem, (), (), (_Q, _Q)
    )
    return out, lse


def backward(backend: AbstractBackend, problem, out, lse, dout, dlse, perturbed):
    """`backend.backward(...)`, per shard of batch and heads (see the module)."""
    if not backend.runs_per_shard or auto_mesh(problem) is None:
        return backend.backward(problem, out, lse, dout, dlse, perturbed)
    is_none = lambda x: x is None
    params = eqx.filter(problem.score_mod, eqx.is_inexact_array)
    param_leaves, param_def = jax.tree.flatten(params)
    grads_params = bool(param_leaves) and any(jax.tree.leaves(perturbed.score_mod))
    given = [x for x in (dout, dlse) if x is not None]

    def plain(p, unwrap, out, lse, *cotangents):
        it = iter(cotangents)
        dout_ = next(it) if dout is not None else None
        dlse_ = next(it) if dlse is not None else None
        g = backend.backward(p, out, lse, dout_, dlse_, _perturbed_like(p, perturbed))
        outs = [g.q, g.k, g.v]
        if grads_params:
            mine = jax.tree.leaves(params, is_leaf=is_none)
            theirs = jax.tree.leaves(unwrap(g.score_mod), is_leaf=is_none)
            if len(theirs) != len(mine):
                theirs = [None] * len(mine)
            outs += [
                jnp.zeros(x.shape, x.dtype) if d is None else d
                for x, d in zip(mine, theirs)
                if x is not None
            ]
        return outs

    roles = (_Q, _Q, *(_Q for _ in given))
    results = (_Q, _KV, _KV, *((_REPLICATED,) * (len(param_leaves) * grads_params)))
    outs = _partitioned(plain, problem, (out, lse, *given), roles, results)
    dq, dk, dv, *dparams = outs
    dscore = jax.tree.unflatten(param_def, dparams) if grads_params else None
    return grads_like(problem, dq, dk, dv, dscore)


def _perturbed_like(p: AttentionProblem, perturbed):
    """`perturbed` (bools per leaf of the given problem) for the shard's problem,
    whose mods may have been converted afresh (see `_offset`): their inexact leaves
    are perturbed if any of the given mod's were."""
    if jax.tree.structure(p) == jax.tree.structure(perturbed):
        return perturbed
    flags = []
    for name in ("score_mod", "mask_mod"):
        mod, given = getattr(p, name), getattr(perturbed, name)
        if mod is not None and jax.tree.structure(mod) != jax.tree.structure(given):
            wanted = any(jax.tree.leaves(given))
            given = jax.tree.map(lambda x: wanted and eqx.is_inexact_array(x), mod)
        flags.append(given)
    return eqx.tree_at(
        lambda q: (q.score_mod, q.mask_mod),
        perturbed,
        tuple(flags),
        is_leaf=lambda x: x is None,
    )
