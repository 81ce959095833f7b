"""Score and mask mods on the register tiles of the Mosaic GPU kernels.

A kernel holds a tile of scores of shape `(R, C)` in the WGMMA layout whose rows are
query positions (forward, dq) or key positions (dk/dv, which works on `Sᵀ`).
`ModTiles` loads a `KernelMod`'s tables for such a tile — per-program scalars read
from GMEM, the rows' slice of a row-kind table once, the columns' slice of a
column-kind table and the Toeplitz tile of a "diag" table at every step — builds the
index tiles the mod reads, and evaluates the mod (or its VJP) elementwise.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from ..._mods import _bind, KernelMod
from .._tiles import clamped
from . import _tile_eval
from ._pipeline import COL, ROW, WG


def read_only_ref_type() -> plgpu.RefType:
    """An `inline_mgpu` reference argument that is only read. jax >= 0.12 counts a
    plain `RefType()` as a write and refuses one to a kernel input; jax 0.11 has no
    `write=` (and no such check)."""
    try:
        return plgpu.RefType(write=False)
    except TypeError:
        return plgpu.RefType()


def toeplitz_tile(ref, shape, flip: bool, interpret: bool):
    """`out[r, c] = ref[c - r + shape[0] - 1]` (`flip`: `ref[r - c + shape[1] - 1]`)
    for a 1-D float32 `ref` (a GMEM slice of `shape[0] + shape[1] - 1` entries): the
    tile of a "diag" table, in the WGMMA layout.

    Each thread loads the entries of its own elements (the tile has only
    `R + C - 1` distinct values, which stay in the L1 cache); Pallas has no such
    gather, so it is written with `plgpu.inline_mgpu`. The interpreter runs no
    `inline_mgpu`: there the same tile comes from `jnp.take`.
    """
    rows, cols = shape
    off = cols - 1 if flip else rows - 1
    if interpret:
        r = lax.broadcasted_iota(jnp.int32, shape, 0)
        c = lax.broadcasted_iota(jnp.int32, shape, 1)
        return jnp.take(ref[...], (r - c if flip else c - r) + off)

    from jax.experimental.mosaic import gpu as mgpu
    from jaxlib.mlir import ir
    from jaxlib.mlir.dialects import arith, llvm, memref

    @plgpu.inline_mgpu(
        arg_types=(read_only_ref_type(),),
        return_type=plgpu.ShapeDtypeStruct(shape, jnp.float32, layout=WG),
    )
    def gather(_, table):
        index = ir.IndexType.get()

        def load(_, rc):
            r, c = rc
            k = arith.subi(r, c) if flip else arith.subi(c, r)
            return memref.load(table, [arith.addi(k, arith.constant(index, off))])

        undef = llvm.mlir_undef(ir.F32Type.get())
        tile = mgpu.FragmentedArray.splat(undef, shape, WG.to_mgpu())
        return tile.foreach(load, create_array=True)

    return gather(ref)


class ModTiles:
    """One mod on `(R, C)` tiles whose rows are `rows` ("q" or "kv") positions.

    `padded = (Lq_pad, Lkv_pad)`: the padded lengths ("diag" tables are indexed by
    `_mods.diag_index`); `lengths = (Lq, Lkv)`: the true lengths (positions past them
    are clamped before a mod sees them) when the corresponding axis is padded, else
    None; `interpret`: running in the interpreter.

    The mod runs on row and column vectors as long as it can (`_tile_eval`): tables
    of the rows' and the columns' kind are vectors, positions too, except in a mod
    with a "diag" table, whose positions are whole tiles: Mosaic GPU's layout
    inference gave up (after minutes) on the backward of ALiBi slopes with a
    relative-position table when the positions were vectors.
    """

    def __init__(
        self,
        mod: KernelMod | None,
        refs,
        shape,
        rows: str,
        padded,
        lengths,
        interpret: bool,
    ):
        self.mod = mod
        self.refs = refs
        self.shape = shape
        self.rows = rows
        self.padded = dict(zip(("q", "kv"), padded))
        self.lq_pad = padded[0]
        self.lengths = dict(zip(("q", "kv"), lengths))
        self.interpret = interpret
        self.tile_positions = mod is not None and any(
            spec.kind == "diag" for spec in mod.specs
        )

    def _diagonals(self, ref, row0, col0):
        """The Toeplitz tile of a "diag" table `ref` (of this program's batch and
        head) at `(row0, col0)`."""
        rows, cols = self.shape
        # The table's entries from the tile's first diagonal (its bottom-left
        # element for rows of queries, its top-right one for rows of keys) on.
        if self.rows == "q":
            start = col0 - row0 + self.lq_pad - rows
        else:
            start = row0 - col0 + self.lq_pad - cols
        window = ref.at[pl.ds(start, rows + cols - 1)]
        return toeplitz_tile(window, self.shape, self.rows == "kv", self.interpret)

    def _is_row(self, kind: str) -> bool:
        return kind == self.rows

    def fixed(self, b, h, row0) -> list:
        """Values that stay for the program's rows: scalars and row-kind slices."""
        if self.mod is None:
            return []
        values = []
        for spec, ref in zip(self.mod.specs, self.refs):
            tb = b if spec.batch else 0
            th = h if spec.head else 0
            if spec.kind == "scalar":
                values.append(ref[tb, th])
            elif self._is_row(spec.kind):
                sl = ref.at[tb, th, pl.ds(row0, self.shape[0])]
                values.append(plgpu.load(sl, layout=ROW, optimized=False))
            else:
                values.append(None)
        return values

    def values(self, b, h, row0, col0, fixed) -> list:
        """Every table's value for the tile at `(row0, col0)`: scalars, vectors of
        the rows (`ROW` layout) or columns (`COL`), "diag" tiles."""
        out = []
        for spec, ref, val in zip(self.mod.specs, self.refs, fixed):
            tb = b if spec.batch else 0
            th = h if spec.head else 0
            if spec.kind == "scalar" or self._is_row(spec.kind):
                out.append(val)
            elif spec.kind == "diag":
                out.append(self._diagonals(ref.at[tb, th], row0, col0))
            else:
                sl = ref.at[tb, th, pl.ds(col0, self.shape[1])]
                out.append(plgpu.load(sl, layout=COL, optimized=False))
        return out

    def _lazy_values(self, values) -> list:
        out = []
        for spec, x in zip(self.mod.specs, values):
            x = x.astype(spec.dtype)
            if spec.kind == "scalar":
                out.append(_tile_eval.scalar(x))
            elif spec.kind == "diag":
                out.append(_tile_eval.tile(x))
            else:
                out.append(_tile_eval.vector(x, 0 if self._is_row(spec.kind) else 1))
        return out

    def position(self, which: str, row0, col0, clamp: bool = True):
        """The `which` ("q" or "kv") position of every row or column of the tile, a
        vector (a whole tile with `tile_positions`)."""
        axis, start = (0, row0) if self._is_row(which) else (1, col0)
        if self.tile_positions:
            pos = plgpu.broadcasted_iota(jnp.int32, self.shape, axis, layout=WG)
        else:
            layout = ROW if axis == 0 else COL
            pos = plgpu.broadcasted_iota(
                jnp.int32, (self.shape[axis],), 0, layout=layout
            )
        pos = pos + jnp.asarray(start, jnp.int32)
        length = self.lengths[which]
        pos = clamped(pos, length) if clamp and length is not None else pos
        if self.tile_positions:
            return _tile_eval.tile(pos)
        return _tile_eval.vector(pos, axis, self.padded[which])

    def _args(self, b, h, row0, col0) -> list:
        """(b, h, q_idx, kv_idx) for the mod (positions made where it reads them)."""
        q = lambda: self.position("q", row0, col0)
        kv = lambda: self.position("kv", row0, col0)
        return [_tile_eval.scalar(b), _tile_eval.scalar(h), q, kv]

    def _run(self, jaxpr, consts, args):
        return _tile_eval.evaluate(jaxpr, consts, args, self.shape, _pin)

    def _broadcast(self, x):
        return _tile_eval.broadcast(x, self.shape, _pin)

    def score(self, s, b, h, row0, col0, values):
        apply = self.mod.split.apply
        args = [_tile_eval.tile(s), *self._args(b, h, row0, col0)]
        (out,) = self._run(apply.jaxpr, apply.consts, args + self._lazy_values(values))
        return self._broadcast(out)

    def score_vjp(self, s, b, h, row0, col0, values, ds, want_values: bool):
        """`(dS before the mod, cotangents of the float values)` for `dS` after it
        (whole tiles)."""
        floats = tuple(
            i
            for i, sp in enumerate(self.mod.specs)
            if want_values and jnp.issubdtype(sp.dtype, jnp.floating)
        )
        pullback = _scalar_pullback(self.mod, floats)
        args = [_tile_eval.tile(ds), _tile_eval.tile(s)]
        args += self._args(b, h, row0, col0) + self._lazy_values(values)
        outs = self._run(pullback.jaxpr, pullback.consts, args)
        outs = [self._broadcast(x) for x in outs]
        return outs[0], dict(zip(floats, outs[1:]))

    def keep(self, b, h, row0, col0, values, kv_bound: int | None):
        """The mask of the tile (bool tile, or a scalar for position-free masks);
        with `kv_bound`, keys at or past it are dropped too."""
        apply = self.mod.split.apply
        args = self._args(b, h, row0, col0) + self._lazy_values(values)
        (keep,) = self._run(apply.jaxpr, apply.consts, args)
        if kv_bound is None and keep.kind == "scalar":
            return keep.value
        keep = self._broadcast(keep)
        if kv_bound is not None:
            pos = self.position("kv", row0, col0, clamp=False)
            inside = _tile_eval.Lazy(pos.kind, (pos.value < kv_bound,))
            keep = keep & self._broadcast(inside)
        return keep


def _pin(x, kind: str):
    """`x` in the register layout of a tile ("tile"), a row or a column vector."""
    return plgpu.layout_cast(x, {"tile": WG, "row": ROW, "col": COL}[kind])


def _scalar_pullback(mod: KernelMod, floats: tuple) -> jax.extend.core.ClosedJaxpr:
    """The flat scalar jaxpr of `(ds, s, b, h, q, kv, *values) -> (dS before the
    mod, *cotangents of values[floats])` (additions of cotangents as `add`)."""
    apply = mod.split.apply

    def pullback(ds, s, b, h, q, kv, *values):
        def f(s_, *vf):
            vals = list(values)
            for i, x in zip(floats, vf):
                vals[i] = x
            return jax.core.eval_jaxpr(
                apply.jaxpr, apply.consts, s_, b, h, q, kv, *vals
            )[0]

        return jax.vjp(f, s, *(values[i] for i in floats))[1](ds)

    structs = [jax.ShapeDtypeStruct((), v.aval.dtype) for v in apply.jaxpr.invars]
    f32 = jax.ShapeDtypeStruct((), jnp.float32)
    closed = jax.make_jaxpr(pullback)(f32, *structs)
    # Transposition sums cotangents with `add_any`, which the Mosaic GPU lowering
    # lacks: re-trace with plain additions (nested calls inlined).
    flat = jax.make_jaxpr(lambda *a: _eval_with_add(closed.jaxpr, closed.consts, *a))(
        f32, *structs
    )
    return flat


@dataclasses.dataclass(frozen=True)
class KernelMods:
    """A kernel's score mod (or None) and mask mod: the tables they add to its
    operands (score mod's first) and their `ModTiles` on its tiles.

    `shape` is the kernel's static shape (`lq`, `lkv`, `lq_pad`, `lkv_pad`,
    `interpret`)."""

    score: KernelMod | None
    mask: KernelMod
    shape: object

    @property
    def tables(self) -> tuple:
        return (() if self.score is None else self.score.tables) + self.mask.tables

    @property
    def lengths(self) -> tuple:
        """(Lq, Lkv), each where padded (else None)."""
        s = self.shape
        return (
            s.lq if s.lq_pad != s.lq else None,
            s.lkv if s.lkv_pad != s.lkv else None,
        )

    @property
    def kv_bound(self) -> int | None:
        """Keys at or past this position are padding (None: none are)."""
        return self.lengths[1]

    def tiles(self, refs, tile, rows: str) -> tuple[ModTiles, ModTiles, tuple]:
        """(score tiles, mask tiles, the refs after the tables') for `(R, C)` tiles
        whose rows are `rows` positions, `refs` starting with the tables' refs."""
        n_score = 0 if self.score is None else len(self.score.tables)
        n_mask = len(self.mask.tables)
        s = self.shape
        make = lambda mod, r: ModTiles(
            mod, r, tile, rows, (s.lq_pad, s.lkv_pad), self.lengths, s.interpret
        )
        return (
            make(self.score, refs[:n_score]),
            make(self.mask, refs[n_score : n_score + n_mask]),
            refs[n_score + n_mask :],
        )


def _eval_with_add(jaxpr, consts, *args):
    """`eval_jaxpr` with `add_any` evaluated as `lax.add`, also in nested calls."""
    env = dict(zip(jaxpr.constvars, consts)) | dict(zip(jaxpr.invars, args))
    read = lambda v: v.val if isinstance(v, jax.extend.core.Literal) else env[v]
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        sub = eqn.params.get("jaxpr") if eqn.primitive.name in ("jit", "pjit") else None
        if eqn.primitive.name == "add_any":
            outs = [lax.add(*invals)]
        elif sub is not None:
            outs = _eval_with_add(sub.jaxpr, sub.consts, *invals)
        else:
            outs = _bind(eqn, invals)
        env.update(zip(eqn.outvars, outs))
    return [read(v) for v in jaxpr.outvars]


SHEAR_WIDTH = 192  # columns of a `diagonal_sums` buffer (64-row tiles)
DIAGONALS = 128  # entries of a `diagonal_sums` result


def diagonal_sums(tile, shear, sync):
    """The sums of a `(64, 64)` float32 tile along its diagonals: `u (128,)` with
    `u[x] = sum(tile[r, c] for r - c == 64 - x)` (`u[0] = 0`), one entry per thread
    of the warpgroup.

    `shear` is a `(64, SHEAR_WIDTH)` float32 shared-memory buffer of the warpgroup
    whose columns outside `[64, 128)` are zero; `sync()` a barrier of the
    warpgroup's threads. The tile is stored at columns `[64, 128)`; row `r` read
    from column `r` on then holds the diagonals in order, so the sum of those 64
    shifted rows is `u` (no atomics, a fixed order: deterministic).
    """
    rows, cols = tile.shape
    if (rows, cols) != (64, 64):
        raise ValueError(f"diagonal_sums takes (64, 64) tiles, got {tile.shape}")
    shear.at[:, pl.ds(64, 64)][...] = tile
    sync()  # the tile is in shared memory
    layout = plgpu.Layout.WG_STRIDED((DIAGONALS,), vec_size=1)
    out = None
    for r in range(rows):
        row = plgpu.load(shear.at[r, pl.ds(r, DIAGONALS)], layout=layout)
        out = row if out is None else out + row
    sync()  # read by every thread before the next tile overwrites it
    return out


def apply_keep(s, keep):
    """`where(keep, s, -inf)`; a scalar `keep` adds 0 or -inf (no per-element select
    with a scalar predicate in the Mosaic GPU lowering)."""
    if jnp.ndim(keep):
        return jnp.where(keep, s, -jnp.inf)
    return s + jnp.where(keep, 0.0, -jnp.inf)
