"""Gradients of a score mod's parameters from a kernel's per-program partial sums.

A kernel backend takes a score mod as hoisted tables (`_mods.KernelMod`): values
looked up per (batch, head) ("scalar"), per query position ("q") or per key position
("kv"). Its backward pass evaluates, on each tile, the VJP of the mod's scalar
arithmetic with respect to the table values it loaded, and sums each over the tile's
axes that the table does not have: a scalar table's entry over the whole tile, a "q"
table's column over the key axis, a "kv" table's row over the query axis. Those sums
are written out, in float32, one per program (no atomics), as *partials*.

This module finishes the job outside the kernel, the same way for every kernel:

1. [`reduce_table_grads`][]: sums the partials over the program axes, and over the
    batch and head axes a table does not have, into one gradient per table entry;
2. [`table_vjp`][]: maps the table gradients back to the mod's own array leaves.
    A table entry is one element of a mod array (`slopes[h]`, `bias[h, bucket(kv -
    q)]`), and many entries may read the same element (a clipped distance, a T5
    bucket, a head shared by a batch): their cotangents are summed by
    [`segment_sum`][], in a fixed order, not by the scatter-add that transposes a
    gather (unordered atomics on GPUs).

No O(L²) array is involved: partials are O(B · H · (L + programs)). Every step is
bitwise reproducible from run to run on one device.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Bool, Float, Int, PyTree

from .._mods import KernelMod, OperandSpec, ScalarMod, tables_select_leaves
from ._base import finish_mod_grads, mod_grad_dtype, upcast_mod


PARTIAL_DTYPE = jnp.float32


def _tail(spec: OperandSpec) -> int:
    """How many trailing position axes a table of this kind has (after B, H)."""
    return 0 if spec.kind == "scalar" else 1  # "q", "kv", "diag": one


def reduce_table_grads(
    partials: Sequence[Array | None],
    specs: Sequence[OperandSpec],
    tables: Sequence[Array],
) -> tuple[Array | None, ...]:
    """Sums a kernel's per-program partial gradients into one gradient per table.

    **Arguments:**

    - `partials`: one entry per table. For a floating table, a float32 array of shape
        `(B, H, *programs, *positions)`: `B` and `H` the problem's batch size and
        number of query heads (every program works on one batch and one query head,
        whatever the table's broadcasting), `programs` any number of axes indexing the
        programs that each wrote a partial (say the key block of a dk/dv program:
        `(B, H, n_kv_blocks)` for a scalar table), and `positions` the table's own
        last axis for kinds "q" (`Lq_pad`), "kv" (`Lkv_pad`) and "diag"
        (`Lq_pad + Lkv_pad - 1`), none for "scalar".
        A program that wrote full rows needs no program axis: `(B, H, Lq_pad)`.
        `None` for integer tables (document ids, ...), which get no gradient.
    - `specs`: the tables' [`OperandSpec`][eqx_flexattn._mods.OperandSpec]s
        (`KernelMod.specs`).
    - `tables`: the tables themselves (`KernelMod.tables`), for their shapes.

    **Returns:** a tuple with, per table, its gradient shaped like the table, in
    float32 (`None` for integer tables).

    **Raises:** `ValueError` when a partial's shape does not fit its table.

    The sum is one `jnp.sum` in float32 over a fixed tuple of axes: the program
    axes, and the batch (head) axis when the table has none (`spec.batch` /
    `spec.head` False: the table broadcasts, so its entry collects every batch
    (head)). On one device XLA compiles a reduction to a fixed summation tree and
    uses no atomics, so the result is bitwise reproducible from run to run for the
    same shapes (not necessarily equal to a left-to-right sum, nor across devices
    or XLA versions).
    """
    if not len(partials) == len(specs) == len(tables):
        raise ValueError(
            f"{len(partials)} partials for {len(specs)} specs and {len(tables)} tables."
        )
    grads = []
    for i, (part, spec, table) in enumerate(zip(partials, specs, tables)):
        if not jnp.issubdtype(table.dtype, jnp.floating):
            if part is not None:
                raise ValueError(
                    f"table {i} holds {table.dtype} values, which get no gradient; "
                    "its partial must be None."
                )
            grads.append(None)
            continue
        tail = _tail(spec)
        n_programs = part.ndim - 2 - tail
        positions = part.shape[part.ndim - tail :]
        if (
            n_programs < 0
            or positions != table.shape[2:]
            or (spec.batch and part.shape[0] != table.shape[0])
            or (spec.head and part.shape[1] != table.shape[1])
        ):
            raise ValueError(
                f"partial {i} has shape {part.shape}, which does not fit a "
                f"{spec.kind!r} table of shape {table.shape} (batch={spec.batch}, "
                f"head={spec.head}): expected (B, H, *programs"
                f"{', positions' if tail else ''})."
            )
        axes = tuple(range(2, 2 + n_programs))
        axes += (0,) if not spec.batch else ()
        axes += (1,) if not spec.head else ()
        total = jnp.sum(part.astype(PARTIAL_DTYPE), axis=axes, keepdims=True)
        grads.append(total.reshape(table.shape))
    return tuple(grads)


def diagonal_partials(
    partials: Float[Array, "b h nkt mq 128"],
    visited: Bool[Array, "#b #h nkt mq"],
    lq_pad: int,
    spec: OperandSpec,
) -> Float[Array, "#b #h diagonals"]:
    """A "diag" table's gradient partials per diagonal, from a kernel's per-tile sums.

    `partials[b, h, kt, qt, x]` is the sum of the table's cotangents on the diagonal
    `kv_idx - q_idx = 64 (kt - qt) + 64 - x` of the 64x64 tile (key tile `kt`, query
    tile `qt`), where `visited` (else ignored: those tiles were not computed). Returns
    `(B|1, H|1, Lq_pad + Lkv_pad - 1)`, entry `diag_index(q_idx, kv_idx, Lq_pad)`, for
    [`reduce_table_grads`][]; the batch (head) axis is summed first when the table
    `spec` has none. Tiles are summed along each tile diagonal with static reshapes
    and reductions (no scatter: deterministic).
    """
    b, h, nkt, mq, n = partials.shape
    if n != 128 or mq * 64 != lq_pad:
        raise ValueError(
            f"partials of shape {partials.shape} do not fit Lq_pad={lq_pad} "
            "(expected (B, H, Nkt, Lq_pad / 64, 128))."
        )
    x = jnp.where(visited[..., None], partials.astype(PARTIAL_DTYPE), 0.0)
    axes = (() if spec.batch else (0,)) + (() if spec.head else (1,))
    x = jnp.sum(x, axis=axes, keepdims=True)
    b, h = x.shape[:2]
    # Entry y = 127 - x of tile (kt, qt) is the table's entry 64 m + y, with
    # m = kt - qt + mq - 1: shear row r = mq - 1 - qt right by r, then sum rows.
    x = jnp.flip(x, axis=(3, 4)).swapaxes(2, 3)  # (b, h, r, kt, y)
    x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, mq), (0, 0)))
    x = x.reshape(b, h, mq * (nkt + mq), n)[:, :, : mq * (nkt + mq - 1)]
    x = x.reshape(b, h, mq, nkt + mq - 1, n).sum(axis=2)  # (b, h, m, y)
    # Overlap-add the 128-entry rows at a stride of 64.
    lo = jnp.pad(x[..., :64], ((0, 0), (0, 0), (0, 1), (0, 0)))
    hi = jnp.pad(x[..., 64:], ((0, 0), (0, 0), (1, 0), (0, 0)))
    return (lo + hi).reshape(b, h, -1)[..., :-1]


def segment_sum(
    values: Float[Array, " n"], segments: Int[Array, " n"], num_segments: int
) -> Float[Array, " num_segments"]:
    """`out[s] = sum(values[segments == s])`, summed in an order fixed by the shapes
    alone: bitwise reproducible, unlike `jax.ops.segment_sum`, whose scatter-add
    runs as unordered atomics on GPUs.

    Segments outside `[0, num_segments)` are dropped. The values are sorted by
    segment (a stable sort), summed by a segmented inclusive scan — a fixed tree of
    additions that never adds across a segment boundary, so a segment's sum carries
    no rounding from its neighbours — and each segment's total is read at its last
    position. O(n log n) work; no scatter.

    !!! Example
        ```python
        segment_sum(jnp.array([1.0, 2.0, 4.0]), jnp.array([2, 0, 2]), 3)
        # Array([2., 0., 5.])
        ```
    """
    n = values.shape[0]
    if n == 0:
        return jnp.zeros((num_segments,), values.dtype)
    segments = jnp.where(
        (segments >= 0) & (segments < num_segments), segments, num_segments
    ).astype(jnp.int32)
    order = jnp.argsort(segments, stable=True)
    seg, val = segments[order], values[order]
    starts = jnp.concatenate([jnp.ones((1,), bool), seg[1:] != seg[:-1]])

    def combine(a, b):
        (start_a, sum_a), (start_b, sum_b) = a, b
        return start_a | start_b, jnp.where(start_b, sum_b, sum_a + sum_b)

    _, sums = lax.associative_scan(combine, (starts, val))
    ids = jnp.arange(num_segments, dtype=jnp.int32)
    last = jnp.searchsorted(seg, ids, side="right") - 1
    last = jnp.clip(last, 0, n - 1)
    return jnp.where(seg[last] == ids, sums[last], jnp.zeros((), values.dtype))


def _table_sources(build, mod: ScalarMod, leaves: list) -> tuple | None:
    """Per table, the flat index of the float mod-array element each of its entries
    reads (in the concatenation of `leaves`, the mod's inexact arrays), or None when
    the tables are not plain selections of those arrays. Built by evaluating the
    tables with each array replaced by the indices of its elements."""
    if not tables_select_leaves(mod):
        return None
    sizes = [x.size for x in leaves]
    if sum(sizes) >= 2**24:  # the indices pass through float32 tables
        return None
    offsets = np.cumsum([0, *sizes])
    it = iter(
        jnp.arange(o, o + x.size, dtype=jnp.int32).reshape(x.shape)
        for o, x in zip(offsets, leaves)
    )
    numbered = jax.tree_util.tree_map(
        lambda x: next(it) if eqx.is_inexact_array(x) else x, mod
    )
    return tuple(build(numbered).tables)


def table_vjp(
    build: Callable[[ScalarMod], KernelMod],
    mod: ScalarMod,
    table_grads: Sequence[Array | None],
) -> PyTree[Array | None]:
    """The gradient of a score mod's array leaves, from its tables' gradients.

    **Arguments:**

    - `build`: how the kernel built its tables from the mod, e.g.
        `lambda m: kernel_mod(m, B, H, Lq, Lkv, lq_pad=..., lkv_pad=...)`.
    - `mod`: the closure-converted score mod (`AttentionProblem.score_mod`).
    - `table_grads`: per table, its gradient (from [`reduce_table_grads`][]), `None`
        for integer tables.

    **Returns:** `eqx.filter(mod, eqx.is_inexact_array)`'s structure: each inexact
    leaf's gradient in the leaf's dtype, `None` for every other leaf (integer arrays
    such as document ids get no gradient) — the score-mod part of a backend's
    `backward` result.

    A table entry is one element of a mod array (`slopes[h]`, `bias[h, d]`, looked
    up on index grids, then cast to float32): the element each entry reads is found
    by building the tables from the arrays' element numbers, and the cotangents of
    the entries reading one element are summed by [`segment_sum`][] (in float32, or
    the leaf's dtype when wider), in a fixed order: bitwise reproducible. Each
    gradient is cast to its leaf's dtype once. A mod whose tables compute with its
    arrays' values (not expressible in the kernels today) falls back to `jax.vjp` of
    `mod -> build(mod).tables`, whose gather transposes are scatter-adds.
    """
    leaves = jax.tree_util.tree_leaves(eqx.filter(mod, eqx.is_inexact_array))
    sources = _table_sources(build, mod, leaves)
    if sources is not None:
        return _summed_by_source(mod, leaves, sources, table_grads)
    wide = upcast_mod(mod, PARTIAL_DTYPE)
    tables, vjp = eqx.filter_vjp(lambda m: build(m).tables, wide)
    if len(table_grads) != len(tables):
        raise ValueError(
            f"{len(table_grads)} table gradients for {len(tables)} tables."
        )
    cotangents = []
    for i, (g, table) in enumerate(zip(table_grads, tables)):
        if not jnp.issubdtype(table.dtype, jnp.floating):
            cotangents.append(None)
            continue
        if g is None or g.shape != table.shape:
            got = None if g is None else g.shape
            raise ValueError(
                f"table {i} has shape {table.shape}, but its gradient is {got}."
            )
        cotangents.append(g.astype(table.dtype))
    (grads,) = vjp(tuple(cotangents))
    return finish_mod_grads(grads, mod)


def _summed_by_source(mod, leaves, sources, table_grads):
    if len(table_grads) != len(sources):
        raise ValueError(
            f"{len(table_grads)} table gradients for {len(sources)} tables."
        )
    dtype = PARTIAL_DTYPE
    for x in leaves:
        dtype = mod_grad_dtype(x.dtype, dtype)
    values, segments = [], []
    for i, (g, src) in enumerate(zip(table_grads, sources)):
        if not jnp.issubdtype(src.dtype, jnp.floating):
            continue  # an integer table: no gradient
        if g is None or g.shape != src.shape:
            got = None if g is None else g.shape
            raise ValueError(
                f"table {i} has shape {src.shape}, but its gradient is {got}."
            )
        values.append(g.astype(dtype).ravel())
        segments.append(src.astype(jnp.int32).ravel())
    total = sum(x.size for x in leaves)
    if values:
        flat = segment_sum(jnp.concatenate(values), jnp.concatenate(segments), total)
    else:
        flat = jnp.zeros((total,), dtype)
    grads, start = [], 0
    for x in leaves:
        grads.append(flat[start : start + x.size].reshape(x.shape))
        start += x.size
    params = eqx.filter(mod, eqx.is_inexact_array)
    treedef = jax.tree_util.tree_structure(params)
    return finish_mod_grads(jax.tree_util.tree_unflatten(treedef, grads), mod)
