"""Tracing user score mods and mask mods into array-valued, PyTree-explicit functions.

A score mod `score_mod(score, b, h, q_idx, kv_idx) -> score` or mask mod
`mask_mod(b, h, q_idx, kv_idx) -> bool` is written, as in PyTorch FlexAttention, for
scalars. Every backend evaluates it on whole blocks by broadcasting
(`jnp.vectorize`, i.e. nested `vmap`s that skip size-1 axes), so any `jnp` expression
works and a lookup such as `bias[h, q_idx - kv_idx]` stays a small gather.

Before a mod crosses `custom_vjp` it is closure-converted: every array it holds
(`eqx.Module` fields) or closes over (tracers captured by a lambda inside the user's
`jit`) becomes an explicit PyTree leaf of a `ScalarMod`. Inexact leaves can then
receive gradients from the fused backward pass.
"""

from __future__ import annotations

import collections
import functools as ft
import types
from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp


INDEX_DTYPE = jnp.int32


def _name(mod: Callable) -> str:
    if isinstance(mod, ScalarMod):
        return mod.name
    return getattr(mod, "__qualname__", None) or type(mod).__qualname__


def _scalar_indices(n: int) -> tuple[jax.ShapeDtypeStruct, ...]:
    return tuple(jax.ShapeDtypeStruct((), INDEX_DTYPE) for _ in range(n))


def _check_output(mod: Callable, out: Any, *, what: str, want_bool: bool) -> None:
    described = f"{what} `{_name(mod)}`"
    if not hasattr(out, "shape"):
        raise TypeError(f"{described} must return one array, got {type(out).__name__}.")
    if out.shape != ():
        raise ValueError(
            f"{described} must map scalar indices to a scalar, but returned shape "
            f"{tuple(out.shape)} for scalar inputs. Index the arrays it uses with "
            "every index argument (e.g. `bias[h, q_idx - kv_idx]`)."
        )
    if want_bool and out.dtype != jnp.bool_:
        raise TypeError(f"{described} must return a bool, got dtype {out.dtype}.")
    if not want_bool and not jnp.issubdtype(out.dtype, jnp.floating):
        raise TypeError(
            f"{described} must return a floating-point score, got dtype {out.dtype}."
        )


def check_mod_shape(mod: Callable, b: int, hq: int, lq: int, lkv: int) -> None:
    """Checks the arrays of a mod against the problem it is applied to.

    Mods that index arrays with `b`, `h`, `q_idx` or `kv_idx` implement
    `check_shape(B, Hq, Lq, Lkv)`, raising `ValueError` when an array is too small for
    the indices it will see (JAX would clamp the gather and give wrong results
    silently). `B` and `Hq` may be 1 when a block mask broadcasts over them.
    """
    check = getattr(mod, "check_shape", None)
    if callable(check):
        check(b, hq, lq, lkv)


def require_size(
    mod: Callable,
    field: str,
    axis: int,
    actual: int,
    name: str,
    needed: int,
    *,
    exact: bool = False,
) -> None:
    """The `ValueError` of a failed `check_shape`: axis `axis` of the array `field`
    of `mod` has size `actual`, but the attention's `name` is `needed` (the size must
    be at least that, or exactly that when `exact`)."""
    if actual == needed or (not exact and actual > needed):
        return
    want = f"{needed}" if exact else f"at least {needed}"
    raise ValueError(
        f"{type(mod).__name__}: `{field}` has size {actual} along axis {axis}, but "
        f"the attention has {name}={needed}, so it must be {want} (out-of-range "
        "indices would be clamped silently)."
    )


def index_grid(b: int, h: int, lq: int, lkv: int) -> tuple[jax.Array, ...]:
    """Broadcastable `(b, h, q_idx, kv_idx)` index arrays of a `(b, h, lq, lkv)` grid
    (`b`, `h`, `lq`, `lkv` are sizes)."""
    return tuple(
        jnp.arange(n, dtype=INDEX_DTYPE).reshape(shape)
        for n, shape in (
            (b, (b, 1, 1, 1)),
            (h, (1, h, 1, 1)),
            (lq, (1, 1, lq, 1)),
            (lkv, (1, 1, 1, lkv)),
        )
    )


class ScalarMod(eqx.Module):
    """A closure-converted mod, called on broadcastable arrays.

    Score mods take `(score, b, h, q_idx, kv_idx)`, mask mods `(b, h, q_idx, kv_idx)`;
    the result has the broadcast shape of the arguments. Its array leaves are exactly
    the arrays the mod depends on; its static part is the traced program.
    """

    fn: Callable
    name: str = eqx.field(static=True)
    score_dtype: Any = eqx.field(static=True, default=None)  # None: a mask mod

    def __call__(self, *args) -> jax.Array:
        shape = jnp.broadcast_shapes(*map(jnp.shape, args))
        *score, b, h, q_idx, kv_idx = args
        idx = [jnp.asarray(i, INDEX_DTYPE) for i in (b, h, q_idx, kv_idx)]
        score = [jnp.asarray(x, self.score_dtype) for x in score]
        return jnp.broadcast_to(
            jnp.vectorize(ft.partial(_run, self.fn))(*score, *idx), shape
        )


def _run(fn: Callable, *args):
    """Runs a closure-converted mod on scalars. Its traced program is evaluated
    directly: Equinox's check of the arguments compares their shardings too, and
    inside `shard_map` those differ from the example arguments it was traced with."""
    if hasattr(fn, "jaxpr") and hasattr(fn, "consts"):
        return jnp.asarray(jax.core.eval_jaxpr(fn.jaxpr, fn.consts, *args)[0])
    return getattr(fn, "fn", fn)(*args)


# How to write an `if` with array operations, per kind of mod.
_ADVICE = {
    "score_mod": "`jnp.where(q_idx >= kv_idx, score, 0.5 * score)` for an `if`",
    "mask_mod": "return the condition itself, `q_idx >= kv_idx`, for `if q_idx >= "
    "kv_idx: return True`, and `jnp.where(in_prefix, True, q_idx >= kv_idx)` (or "
    "`in_prefix | (q_idx >= kv_idx)`) for an `if` choosing between conditions",
}


def _checked(mod: Callable, args: tuple, what: str, signature: str) -> None:
    """Checks that `mod` maps scalar `args` to a scalar bool (mask mods) or float
    (score mods)."""
    if not callable(mod):
        raise TypeError(f"`{what}` must be callable, got {type(mod).__name__}.")
    try:
        out = eqx.filter_eval_shape(mod, *args)
    except (  # `if q_idx > kv_idx:`, `range(q_idx)`, ...
        jax.errors.ConcretizationTypeError,
        jax.errors.TracerIntegerConversionError,
    ) as e:
        raise TypeError(
            f"{what} `{_name(mod)}` uses the value of an index"
            + (" or score" if what == "score_mod" else "")
            + " in Python control flow (`if`, `and`/`or`, `bool()`, `int()`, a Python "
            "loop bound). Mods are traced once for whole blocks of indices, so write "
            f"it with array operations instead: {_ADVICE[what]}, `&` / `|` for `and` "
            "/ `or`, `jnp.minimum` / `jnp.maximum` for `min` / `max`. "
            f"(JAX: {type(e).__name__}: {str(e).splitlines()[0]})"
        ) from e
    except TypeError as e:
        raise TypeError(
            f"{what} `{_name(mod)}` could not be called as `{signature}`: {e}"
        ) from e
    _check_output(mod, out, what=what, want_bool=what == "mask_mod")


def convert_score_mod(score_mod: Callable, score_dtype) -> ScalarMod:
    """Closure-converts `score_mod` for scores of `score_dtype`, checking its output."""
    score_dtype = jnp.dtype(score_dtype)
    args = (jax.ShapeDtypeStruct((), score_dtype), *_scalar_indices(4))
    _checked(score_mod, args, "score_mod", "score_mod(score, b, h, q_idx, kv_idx)")
    fn = eqx.filter_closure_convert(_CastOutput(score_mod, score_dtype), *args)
    return ScalarMod(fn, _name(score_mod), score_dtype)


def convert_mask_mod(mask_mod: Callable) -> ScalarMod:
    """Closure-converts `mask_mod`, checking that it returns a scalar bool."""
    args = _scalar_indices(4)
    _checked(mask_mod, args, "mask_mod", "mask_mod(b, h, q_idx, kv_idx)")
    traced = mask_mod
    if (
        isinstance(mask_mod, types.FunctionType)
        and mask_mod.__closure__ is None
        and closes_over_arrays(mask_mod)
    ):
        # Equinox keeps a function without a closure as it is, with the arrays in
        # its default arguments: trace it instead.
        traced = ft.partial(mask_mod)
    fn = eqx.filter_closure_convert(traced, *args)
    return ScalarMod(_canonical_program(fn), _name(mask_mod))


# Programs of converted mask mods, by their text: the most recent ones.
_PROGRAMS: collections.OrderedDict[str, Any] = collections.OrderedDict()
_MAX_PROGRAMS = 256


def _canonical_program(fn: Callable) -> Callable:
    """`fn` (a closure-converted function) with its jaxpr replaced by an earlier,
    identical one.

    Each conversion traces a fresh jaxpr, and jaxprs compare by identity: without
    this, every `BlockMask` built from the same function would be a new static
    structure to `jit`, and retrace it. Two jaxprs with the same text compute the
    same function of the same inputs (the hoisted arrays are inputs, not text; a
    Python object named in the text, such as a callback, is kept alive by the
    stored jaxpr, so its address cannot be reused while the entry exists).
    """
    jaxpr = getattr(fn, "jaxpr", None)
    if jaxpr is None:  # nothing was traced: the function itself is static
        return fn
    key = str(jaxpr)
    known = _PROGRAMS.get(key)
    if known is None:
        _PROGRAMS[key] = jaxpr
        if len(_PROGRAMS) > _MAX_PROGRAMS:
            _PROGRAMS.popitem(last=False)
        return fn
    _PROGRAMS.move_to_end(key)
    return eqx.tree_at(lambda f: f.jaxpr, fn, known)


def closes_over_arrays(mod: Callable) -> bool:
    """Whether `mod` holds arrays that PyTree flattening does not see: captured in a
    function's closure or default arguments, bound by a `functools.partial`, or held
    by a plain (non-PyTree) callable object or bound method, itself or inside a
    field of a module. Those must be hoisted into leaves before crossing `jit`."""
    seen: set[int] = set()

    def holds(obj, arrays_count: bool) -> bool:
        for leaf in jax.tree_util.tree_leaves(obj):
            if eqx.is_array(leaf):
                if arrays_count:
                    return True
                continue
            if id(leaf) in seen:
                continue
            seen.add(id(leaf))
            if holds(_hidden_contents(leaf), True):
                return True
        return False

    return holds(mod, False)


def _hidden_contents(obj) -> tuple:
    """What a non-PyTree object refers to that a call may read."""
    if isinstance(obj, type | types.ModuleType):
        return ()
    if isinstance(obj, ft.partial):
        return (obj.func, obj.args, obj.keywords)
    if isinstance(obj, types.MethodType):
        return (obj.__func__, obj.__self__)
    if isinstance(obj, types.FunctionType):
        cells = []
        for cell in obj.__closure__ or ():
            try:
                cells.append(cell.cell_contents)
            except ValueError:  # an empty cell
                pass
        return (cells, obj.__defaults__, obj.__kwdefaults__)
    attributes = getattr(obj, "__dict__", None)
    return (dict(attributes),) if isinstance(attributes, dict) else ()


class _CastOutput(eqx.Module):
    mod: Callable
    dtype: Any = eqx.field(static=True)

    def __call__(self, *args):
        return jnp.asarray(self.mod(*args)).astype(self.dtype)


# ---------------------------------------------------------------------------------
# Mods as kernel operands.
#
# A fused kernel cannot close over arrays, and Mosaic GPU has no gather on register
# tiles. So every lookup a mod makes into its arrays (`slopes[h]`, `ids[b, q_idx]`) is
# hoisted out of the kernel: the lookup's value is precomputed, outside the kernel, as
# a small *table* over the indices it depends on, and the kernel loads the table's
# entry for its tile:
#   - "scalar": depends on the batch and head at most -> one value per program;
#   - "q": depends on q_idx (and maybe b, h) -> the query block's slice, a column;
#   - "kv": depends on kv_idx (and maybe b, h) -> the key block's slice, a row;
#   - "diag": depends on q_idx and kv_idx only through their difference `kv_idx -
#     q_idx` (a relative-position table, T5 buckets) -> one value per diagonal, which
#     a kernel reads as a Toeplitz tile.
# What remains of the mod is scalar arithmetic on (score, b, h, q_idx, kv_idx, table
# values), which a kernel evaluates elementwise on its tiles. A lookup indexed by q_idx
# and kv_idx otherwise (`table[q_idx, kv_idx]`) or by the score is not a kernel operand:
# `kernel_mod` raises NotImplementedError saying so, and the kernel backend declines.

_INDEX_NAMES = ("b", "h", "q", "kv")
_CALL_PRIMITIVES = {
    "jit": "jaxpr",
    "pjit": "jaxpr",
    "closed_call": "call_jaxpr",
    "core_call": "call_jaxpr",
    "custom_jvp_call": "call_jaxpr",
    "custom_vjp_call": "call_jaxpr",
    "remat": "jaxpr",
    "checkpoint": "jaxpr",
}


def _read(env, v):
    return v.val if isinstance(v, jax.extend.core.Literal) else env[v]


def _bind(eqn, invals) -> list:
    """Applies one equation's primitive (jax 0.10 and 0.11 spell this differently)."""
    params = eqn.primitive.get_bind_params(eqn.params)
    subfuns = ()
    if isinstance(params, tuple):  # jax < 0.11: (subfuns, params)
        subfuns, params = params
    outs = eqn.primitive.bind(*subfuns, *invals, **params)
    return list(outs) if eqn.primitive.multiple_results else [outs]


def _eval_inlined(jaxpr, consts, *args):
    """`eval_jaxpr`, but nested calls (`jit`, `custom_jvp`, ...) are evaluated
    equation by equation: tracing this gives one flat jaxpr."""
    env = dict(zip(jaxpr.constvars, consts)) | dict(zip(jaxpr.invars, args))
    for eqn in jaxpr.eqns:
        invals = [_read(env, v) for v in eqn.invars]
        inner = _CALL_PRIMITIVES.get(eqn.primitive.name)
        if inner is not None and inner in eqn.params:
            sub = eqn.params[inner]
            if isinstance(sub, jax.extend.core.ClosedJaxpr):
                outs = _eval_inlined(sub.jaxpr, sub.consts, *invals)
            else:
                outs = _eval_inlined(sub, (), *invals)
        else:
            outs = _bind(eqn, invals)
        env.update(zip(eqn.outvars, outs))
    return [_read(env, v) for v in jaxpr.outvars]


class OperandSpec(NamedTuple):
    """How a kernel loads one hoisted table.

    `kind` is "scalar" (table `(B|1, H|1)`: the program's entry), "q" (table
    `(B|1, H|1, Lq_pad)`: the query block's slice), "kv" (table `(B|1, H|1, Lkv_pad)`:
    the key block's slice) or "diag" (table `(B|1, H|1, Lq_pad + Lkv_pad - 1)`, entry
    [`diag_index`][]`(q_idx, kv_idx, Lq_pad)` for the diagonal `kv_idx - q_idx`).
    `dtype` is the value's dtype inside the mod; tables are stored as int32 (integers,
    bools) or float32 (floats).
    """

    kind: str
    batch: bool
    head: bool
    dtype: Any


def diag_index(q_idx, kv_idx, lq_pad: int):
    """The entry of a "diag" table for the positions `(q_idx, kv_idx)`."""
    return kv_idx - q_idx + (lq_pad - 1)


def _storage_dtype(dtype):
    if jnp.issubdtype(dtype, jnp.floating):
        return jnp.float32
    return jnp.int32


class _Split(NamedTuple):
    """The static result of splitting a mod's program (hashable)."""

    flat: Any  # ClosedJaxpr: (*consts, *args) -> out
    n_consts: int
    hoisted: tuple  # flat-jaxpr vars whose values become tables
    specs: tuple[OperandSpec, ...]
    apply: Any  # ClosedJaxpr: (*args, *values) -> out, scalar arithmetic only
    uses: frozenset  # which of "b", "h", "q", "kv" the apply reads


def _scalar_args(mod: ScalarMod) -> list:
    is_score = mod.score_dtype is not None
    args = [jax.ShapeDtypeStruct((), mod.score_dtype)] if is_score else []
    return args + list(_scalar_indices(4))


def _program(mod: ScalarMod):
    """(jaxpr, consts) of a converted mod: its arrays are the consts."""
    fn = mod.fn
    if hasattr(fn, "jaxpr"):
        return fn.jaxpr, jax.tree_util.tree_leaves(fn.consts)
    closed = jax.make_jaxpr(fn)(*_scalar_args(mod))  # a mod holding no arrays
    return closed.jaxpr, list(closed.consts)


def _split(mod: ScalarMod) -> _Split:
    program, consts = _program(mod)
    is_score = mod.score_dtype is not None
    args = _scalar_args(mod)
    flat = jax.make_jaxpr(lambda c, *a: _eval_inlined(program, c, *a))(consts, *args)
    jaxpr = flat.jaxpr
    n_consts = len(jax.tree_util.tree_leaves(consts))
    const_vars = jaxpr.invars[:n_consts]
    arg_vars = jaxpr.invars[n_consts:]
    names = (["score"] if is_score else []) + list(_INDEX_NAMES)
    deps = {v: frozenset() for v in const_vars}
    deps |= {v: frozenset({n}) for v, n in zip(arg_vars, names)}
    scalar = lambda v: isinstance(v, jax.extend.core.Literal) or v.aval.shape == ()
    hoisted = [v for v in const_vars if v.aval.shape == ()]
    positions = {id(arg_vars[-2]), id(arg_vars[-1])}  # q_idx, kv_idx
    for eqn in jaxpr.eqns:
        d = frozenset().union(
            *(deps[v] for v in eqn.invars if not isinstance(v, jax.extend.core.Literal))
        )
        if eqn.primitive.name == "sub" and {id(v) for v in eqn.invars} == positions:
            d = frozenset({"diag"})  # kv_idx - q_idx, or its negative
        for v in eqn.outvars:
            deps[v] = d
        lookup = any(not scalar(v) for v in eqn.invars)
        if lookup:
            hoisted += [v for v in eqn.outvars if scalar(v)]
    what = f"{'score_mod' if is_score else 'mask_mod'} `{mod.name}`"
    # Keep only the hoisted values the output needs (walking back from the output
    # and stopping at hoisted values), and check what remains is scalar arithmetic.
    hoisted_set = set(hoisted)
    live = {v for v in jaxpr.outvars if not isinstance(v, jax.extend.core.Literal)}
    for eqn in reversed(jaxpr.eqns):
        if not any(v in live for v in eqn.outvars):
            continue
        if all(v in hoisted_set for v in eqn.outvars):
            continue  # a table value: computed outside the kernel
        for v in eqn.invars:
            if not isinstance(v, jax.extend.core.Literal):
                live.add(v)
    needed = live & hoisted_set
    for v in live:
        if v in hoisted_set or v in arg_vars:
            continue
        if v in const_vars or v.aval.shape != ():
            raise NotImplementedError(
                f"{what} computes with a whole array (shape {v.aval.shape}) rather "
                "than looking up single entries: kernels take only element lookups."
            )
    hoisted = [v for v in hoisted if v in needed]
    specs = []
    for v in hoisted:
        d = deps[v]
        if "score" in d:
            raise NotImplementedError(
                f"{what} indexes an array with a value computed from the score; "
                "kernels take lookups indexed by b, h, q_idx and kv_idx only."
            )
        if len(d & {"q", "kv", "diag"}) > 1:
            raise NotImplementedError(
                f"{what} looks up an array at an index that depends on both q_idx and "
                "kv_idx other than through their difference `kv_idx - q_idx`; kernels "
                "take lookups indexed by q_idx, by kv_idx, or by that difference."
            )
        kind = next((k for k in ("q", "kv", "diag") if k in d), "scalar")
        specs.append(OperandSpec(kind, "b" in d, "h" in d, v.aval.dtype))

    hoisted_t = tuple(hoisted)

    def apply_fn(*a):
        a, values = a[: len(args)], a[len(args) :]
        env = dict(zip(arg_vars, a)) | dict(zip(hoisted_t, values))
        for eqn in jaxpr.eqns:
            if all(v in env for v in eqn.outvars) or not any(
                v in live for v in eqn.outvars
            ):
                continue
            invals = [_read(env, v) for v in eqn.invars]
            env.update(zip(eqn.outvars, _bind(eqn, invals)))
        return _read(env, jaxpr.outvars[0])

    value_structs = [jax.ShapeDtypeStruct((), s.dtype) for s in specs]
    apply = jax.make_jaxpr(apply_fn)(*args, *value_structs)
    for v in _all_vars(apply.jaxpr):
        if jnp.dtype(v.aval.dtype).itemsize > 4:
            raise NotImplementedError(
                f"{what} computes in {v.aval.dtype} (64-bit arrays under "
                "jax_enable_x64); "
                "kernels compute in 32 bits."
            )
    for s in specs:
        if jnp.dtype(s.dtype).itemsize > 4:
            raise NotImplementedError(
                f"{what} reads a {s.dtype} array; kernels take 32-bit tables."
            )
    arg_in = apply.jaxpr.invars[len(args) - 4 : len(args)]
    read_vars = {
        v
        for e in apply.jaxpr.eqns
        for v in e.invars
        if not isinstance(v, jax.extend.core.Literal)
    } | {v for v in apply.jaxpr.outvars if not isinstance(v, jax.extend.core.Literal)}
    uses = frozenset(n for n, v in zip(_INDEX_NAMES, arg_in) if v in read_vars)
    return _Split(flat, n_consts, hoisted_t, tuple(specs), apply, uses)


def _all_vars(jaxpr):
    yield from jaxpr.invars
    for e in jaxpr.eqns:
        yield from e.outvars


class KernelMod(eqx.Module):
    """A mod in the form a kernel takes: tables to load, and scalar arithmetic.

    Built by [`kernel_mod`][]. `tables[i]` is loaded as `specs[i]` says; `apply`
    evaluates the mod on tiles from those values.
    """

    tables: tuple[jax.Array, ...]
    split: _Split = eqx.field(static=True)
    name: str = eqx.field(static=True)

    @property
    def specs(self) -> tuple[OperandSpec, ...]:
        return self.split.specs

    @property
    def uses(self) -> frozenset:
        """Which of "b", "h", "q", "kv" the mod reads besides its tables."""
        return self.split.uses

    def apply(self, *args_and_values):
        """`apply(score, b, h, q_idx, kv_idx, *values)` (score mods) or
        `apply(b, h, q_idx, kv_idx, *values)` (mask mods), on broadcastable arrays
        (`values[i]` loaded from `tables[i]`, stored dtype): elementwise."""
        n = len(args_and_values) - len(self.specs)
        args, values = args_and_values[:n], args_and_values[n:]
        values = [jnp.asarray(x).astype(s.dtype) for x, s in zip(values, self.specs)]
        return jnp.vectorize(self._fn)(*args, *values)

    def apply_tile(self, *args_and_values):
        """`apply` inside a kernel: every array argument has the tile's shape (the
        kernel broadcasts rows and columns itself), the others are scalars."""
        n = len(args_and_values) - len(self.specs)
        args = list(args_and_values[:n]) + [
            x.astype(s.dtype) for x, s in zip(args_and_values[n:], self.specs)
        ]
        axes = [0 if jnp.ndim(x) else None for x in args]
        if all(a is None for a in axes):
            return self._fn(*args)
        fn = self._fn
        for _ in range(max(jnp.ndim(x) for x in args)):
            fn = jax.vmap(fn, in_axes=axes)
        return fn(*args)

    def _fn(self, *args):
        apply = self.split.apply
        return jax.core.eval_jaxpr(apply.jaxpr, apply.consts, *args)[0]


def kernel_mod_specs(mod: ScalarMod) -> tuple[OperandSpec, ...]:
    """The tables `kernel_mod` would build for `mod`, without building them.

    Raises `NotImplementedError`, with a sentence, for mods a kernel cannot take.
    """
    return _split_cached(mod).specs


def kernel_mod(
    mod: ScalarMod, b: int, h: int, lq: int, lkv: int, *, lq_pad: int, lkv_pad: int
) -> KernelMod:
    """Splits a closure-converted mod into tables and scalar arithmetic for kernels.

    `b`, `h`, `lq`, `lkv` are the problem's sizes; tables of kind "q"/"kv" are built
    for `lq_pad`/`lkv_pad` positions (positions past the length read the last one).
    Raises `NotImplementedError`, with a sentence, for mods a kernel cannot take.
    """
    split = _split_cached(mod)
    consts = _program(mod)[1]
    is_score = mod.score_dtype is not None
    hoisted = split.hoisted

    def values_at(bi, hi, qi, kvi):
        env_fn = lambda *a: _eval_to(split.flat.jaxpr, hoisted, consts, *a)
        score = [jnp.zeros((), mod.score_dtype)] if is_score else []
        return env_fn(*score, bi, hi, qi, kvi)

    tables = []
    for i, spec in enumerate(split.specs):
        bi = jnp.arange(b if spec.batch else 1, dtype=INDEX_DTYPE)[:, None, None]
        hi = jnp.arange(h if spec.head else 1, dtype=INDEX_DTYPE)[None, :, None]
        zero = jnp.zeros((1, 1, 1), INDEX_DTYPE)
        qi = kvi = zero
        if spec.kind == "q":
            qi = jnp.minimum(jnp.arange(lq_pad, dtype=INDEX_DTYPE), lq - 1)[None, None]
        elif spec.kind == "kv":
            kvi = jnp.minimum(jnp.arange(lkv_pad, dtype=INDEX_DTYPE), lkv - 1)
            kvi = kvi[None, None]
        elif spec.kind == "diag":
            # Each diagonal at a pair of positions on it (diagonals past the
            # lengths read the last one), both positions in range.
            entry = jnp.arange(lq_pad + lkv_pad - 1, dtype=INDEX_DTYPE)
            diag = jnp.clip(entry - (lq_pad - 1), 1 - lq, lkv - 1)
            qi = jnp.maximum(-diag, 0)
            kvi = (qi + diag)[None, None]
            qi = qi[None, None]
        one = jnp.vectorize(lambda *a, i=i: values_at(*a)[i])(bi, hi, qi, kvi)
        one = one.astype(_storage_dtype(spec.dtype))
        tables.append(one[..., 0] if spec.kind == "scalar" else one)
    return KernelMod(tuple(tables), split, mod.name)


def _eval_to(jaxpr, wanted, consts, *args):
    """Values of the variables `wanted` of a flat jaxpr (its invars: consts, args)."""
    n = len(consts)
    env = dict(zip(jaxpr.invars[:n], consts)) | dict(zip(jaxpr.invars[n:], args))
    needed = set(wanted) - set(env)
    eqns = []  # only those the wanted values depend on
    for eqn in reversed(jaxpr.eqns):
        if needed.intersection(eqn.outvars):
            eqns.append(eqn)
            needed.update(
                v
                for v in eqn.invars
                if not isinstance(v, jax.extend.core.Literal) and v not in env
            )
    for eqn in reversed(eqns):
        invals = [_read(env, v) for v in eqn.invars]
        env.update(zip(eqn.outvars, _bind(eqn, invals)))
    return [env[v] for v in wanted]


# Primitives that select elements of their first operand without computing with
# its values.
_SELECTIONS = frozenset(
    {"gather", "dynamic_slice", "slice", "squeeze", "reshape", "broadcast_in_dim"}
)


def tables_select_leaves(mod: ScalarMod) -> bool:
    """Whether each table of `kernel_mod(mod, ...)` holds elements of the mod's float
    arrays, selected without arithmetic on them (and no index computed from a float
    array). Then a table's gradient maps back to the arrays by summing the
    cotangents of the table entries that read each element
    (`_backends._reduce.table_vjp`)."""
    split = _split_cached(mod)
    jaxpr = split.flat.jaxpr
    consts = jaxpr.invars[: split.n_consts]
    tainted = {v for v in consts if jnp.issubdtype(v.aval.dtype, jnp.inexact)}
    hoisted = set(split.hoisted)
    for eqn in jaxpr.eqns:
        hits = [
            i
            for i, v in enumerate(eqn.invars)
            if not isinstance(v, jax.extend.core.Literal) and v in tainted
        ]
        if not hits:
            continue
        if eqn.primitive.name not in _SELECTIONS or hits != [0]:
            return False
        # A table value is where a table ends: what reads it runs in the kernel.
        tainted.update(v for v in eqn.outvars if v not in hoisted)
    return True


_SPLITS: dict = {}


def _split_cached(mod: ScalarMod) -> _Split:
    """Splits are cached per traced program (the jaxpr object), so a backend's
    `check` and `forward` analyse a mod once."""
    program = getattr(mod.fn, "jaxpr", None)
    if program is None:  # no arrays: the program is traced afresh (cheap)
        return _split(mod)
    key = (id(program), mod.score_dtype)
    hit = _SPLITS.get(key)
    if hit is not None and hit[0] is program:
        split = hit[1]
    else:
        try:
            split = _split(mod)
        except NotImplementedError as e:
            split = e
        if len(_SPLITS) > 256:
            _SPLITS.clear()
        _SPLITS[key] = (program, split)
    if isinstance(split, NotImplementedError):
        raise split
    return split
