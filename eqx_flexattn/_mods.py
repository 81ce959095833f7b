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
from typing import Any

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
        return jnp.broadcast_to(jnp.vectorize(self.fn)(*score, *idx), shape)


def _checked(mod: Callable, args: tuple, what: str, signature: str) -> None:
    """Checks that `mod` maps scalar `args` to a scalar bool (mask mods) or float
    (score mods)."""
    if not callable(mod):
        raise TypeError(f"`{what}` must be callable, got {type(mod).__name__}.")
    try:
        out = eqx.filter_eval_shape(mod, *args)
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
