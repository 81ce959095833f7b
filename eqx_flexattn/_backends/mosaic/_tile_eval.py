"""Evaluating a mod's scalar program on a kernel's `(R, C)` tile, on row and column
vectors for as long as the program allows.

A mod is a scalar jaxpr (`_mods.KernelMod.split.apply`). Mapped over a whole tile,
every operation costs one instruction per element; but many of its values depend on
the rows only (`q_idx`, a row table's value) or the columns only (`kv_idx`), and
those cost one instruction per row or column. Here each value is kept as what it
is — a scalar, a row vector, a column vector, a whole tile, or the sum of a row and
a column vector — and broadcast to the tile only when an operation mixes rows with
columns.

Integer sums of positions stay sums through additions, negations and integer
scalings (wraparound arithmetic is associative, so this is exact), and an exactly
representable one converts to float32 part by part: ALiBi's
`float(kv_idx - q_idx)` becomes one float addition per element instead of an
integer subtraction and a conversion (the conversion issues at the rate of `exp2`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from ..._mods import _bind


EXACT_F32 = 2**24  # integers of smaller magnitude are exact in float32


@dataclasses.dataclass(frozen=True)
class Lazy:
    """A value of the tile program: `kind` is "scalar", "row", "col", "tile" or
    "sum" (`parts = (row, col)`, the value `row[:, None] + col[None, :]`); `bound`,
    where known, bounds the magnitude of an integer value."""

    kind: str
    parts: tuple
    bound: int | None = None

    @property
    def value(self):
        (x,) = self.parts
        return x

    @property
    def dtype(self):
        return jnp.result_type(self.parts[0])


def scalar(x, bound: int | None = None) -> Lazy:
    return Lazy("scalar", (x,), bound)


def vector(x, axis: int, bound: int | None = None) -> Lazy:
    """A row vector (`axis=0`: one value per tile row) or a column vector."""
    return Lazy("row" if axis == 0 else "col", (x,), bound)


def tile(x) -> Lazy:
    return Lazy("tile", (x,))


def _no_layouts(x, kind):
    return x


def broadcast(x: Lazy, shape, pin=_no_layouts) -> jax.Array:
    """`x` as a whole `shape` tile."""
    if x.kind == "tile":
        return x.value
    if x.kind == "sum":
        row, col = x.parts
        return pin(
            broadcast(vector(row, 0), shape, pin)
            + broadcast(vector(col, 1), shape, pin),
            "tile",
        )
    if x.kind == "scalar":
        return pin(lax.broadcast_in_dim(jnp.asarray(x.value), shape, ()), "tile")
    dims = (0,) if x.kind == "row" else (1,)
    return pin(lax.broadcast_in_dim(x.value, shape, dims), "tile")


def evaluate(
    jaxpr, consts, args: list[Lazy | Callable[[], Lazy]], shape, pin=_no_layouts
) -> list[Lazy]:
    """Evaluates the flat scalar `jaxpr` elementwise on the tile values `args` (each
    a `Lazy`, or a function making one, called only if the program reads it).

    `pin(array, kind)` fixes the register layout of each new "row", "col" or "tile"
    array (the Mosaic GPU compiler's layout inference would otherwise search for
    them, and may give up)."""
    env = {v: scalar(c) for v, c in zip(jaxpr.constvars, consts)}
    env.update(zip(jaxpr.invars, args))

    def read(v):
        if isinstance(v, jax.extend.core.Literal):
            val = v.val
            integral = jnp.issubdtype(jnp.result_type(val), jnp.integer)
            return scalar(val, abs(int(val)) if integral else None)
        if callable(env[v]):  # built on first use: nothing unused reaches the kernel
            env[v] = env[v]()
        return env[v]

    for eqn in _live(jaxpr):
        invals = [read(v) for v in eqn.invars]
        out = _positions(eqn, invals, pin)
        outs = [out] if out is not None else _elementwise(eqn, invals, shape, pin)
        env.update(zip(eqn.outvars, outs))
    return [read(v) for v in jaxpr.outvars]


def _live(jaxpr) -> list:
    """The equations whose results are used (a pullback recomputes the mod's
    output, which it never reads; the kernel compiler would still lower it)."""
    live = {v for v in jaxpr.outvars if not isinstance(v, jax.extend.core.Literal)}
    eqns = []
    for eqn in reversed(jaxpr.eqns):
        if any(v in live for v in eqn.outvars):
            eqns.append(eqn)
            live.update(
                v for v in eqn.invars if not isinstance(v, jax.extend.core.Literal)
            )
    return eqns[::-1]


def _terms(x: Lazy) -> tuple:
    """`(scalar, row, col)` terms of an integer value (None where absent)."""
    if x.kind == "scalar":
        return (x.value, None, None)
    if x.kind == "row":
        return (None, x.value, None)
    if x.kind == "col":
        return (None, None, x.value)
    return (None, *x.parts)


def _combine(a, b, op):
    if a is None and b is None:
        return None
    if b is None:
        return a
    if a is None:
        return b if op is lax.add else lax.neg(b)
    return op(a, b)


def _add_bounds(*bounds):
    return None if any(b is None for b in bounds) else sum(bounds)


def _pinned(x: Lazy, pin) -> Lazy:
    if x.kind == "scalar":
        return x
    if x.kind == "sum":
        return Lazy("sum", (pin(x.parts[0], "row"), pin(x.parts[1], "col")), x.bound)
    return Lazy(x.kind, (pin(x.value, x.kind),), x.bound)


def _from_terms(s, r, c, bound) -> Lazy:
    if r is not None and s is not None:
        r, s = r + s, None
    elif c is not None and s is not None:
        c, s = c + s, None
    if r is not None and c is not None:
        return Lazy("sum", (r, c), bound)
    if r is not None:
        return vector(r, 0, bound)
    if c is not None:
        return vector(c, 1, bound)
    return scalar(s, bound)


def _positions(eqn, invals, pin) -> Lazy | None:
    """Integer sums of row and column vectors kept as sums (and converted to
    float32 part by part when exact); None where the generic rule applies."""
    out = _position_rule(eqn, invals)
    return None if out is None else _pinned(out, pin)


def _position_rule(eqn, invals) -> Lazy | None:
    name = eqn.primitive.name
    kinds = {x.kind for x in invals}
    if "tile" in kinds or not (kinds & {"row", "col", "sum"}):
        return None
    if any(not jnp.issubdtype(x.dtype, jnp.integer) for x in invals):
        return None
    if name in ("add", "sub") and (kinds >= {"row", "col"} or "sum" in kinds):
        op = lax.add if name == "add" else lax.sub
        ta, tb = (_terms(x) for x in invals)
        terms = [_combine(a, b, op) for a, b in zip(ta, tb)]
        return _from_terms(*terms, _add_bounds(*(x.bound for x in invals)))
    if name == "neg" and kinds == {"sum"}:
        (x,) = invals
        return Lazy("sum", tuple(lax.neg(p) for p in x.parts), x.bound)
    if name == "mul" and "sum" in kinds and "scalar" in kinds:
        x, k = invals if invals[0].kind == "sum" else invals[::-1]
        bound = None if None in (x.bound, k.bound) else x.bound * k.bound
        return Lazy("sum", tuple(p * k.value for p in x.parts), bound)
    if (
        name == "convert_element_type"
        and kinds == {"sum"}
        and eqn.params["new_dtype"] == jnp.float32
        and invals[0].bound is not None
        and invals[0].bound < EXACT_F32
    ):
        (x,) = invals
        return Lazy("sum", tuple(p.astype(jnp.float32) for p in x.parts))
    return None


def _elementwise(eqn, invals, shape, pin) -> list[Lazy]:
    """One equation on vectors when its operands share an axis, else on tiles."""
    kinds = {x.kind for x in invals} - {"scalar"}
    if not kinds:
        return [scalar(o) for o in _bind(eqn, [x.value for x in invals])]
    if kinds in ({"row"}, {"col"}):
        (kind,) = kinds
        make = lambda o: vector(o, 0 if kind == "row" else 1)
        args = [x.value for x in invals]
    else:
        make = tile
        args = [
            x.value if x.kind == "scalar" else broadcast(x, shape, pin) for x in invals
        ]
    axes = [None if x.kind == "scalar" else 0 for x in invals]
    fn = lambda *a: _bind(eqn, list(a))
    for _ in range(jnp.ndim(next(a for a, ax in zip(args, axes) if ax == 0))):
        fn = jax.vmap(fn, in_axes=axes)
    return [_pinned(make(o), pin) for o in fn(*args)]
