"""`flex_attention`: input checks, backend dispatch and the custom-VJP wiring."""

from __future__ import annotations

import math
import numbers
import os
import sys
import warnings
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from . import _backends, _partitioned
from ._aux import AuxOutput, AuxRequest, max_scores
from ._backends import AbstractBackend, AttentionProblem, select_backend
from ._backends._base import accumulator_dtype
from ._backends._config import normalise_options
from ._block_mask import BlockMask, full_block_mask
from ._mods import check_mod_shape, convert_mask_mod, convert_score_mod
from ._retrace import note_traced_mods


_DTYPES = (jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64)


def _check_array(name: str, x: Any) -> Array:
    if not isinstance(x, jax.Array | np.ndarray):
        raise TypeError(f"`{name}` must be an array, got {type(x).__name__}.")
    x = jnp.asarray(x)
    if x.ndim != 4:
        raise ValueError(
            f"`{name}` must be 4-dimensional (batch, heads, length, head_dim), got "
            f"shape {x.shape}."
        )
    if 0 in x.shape:
        raise ValueError(f"`{name}` has an empty dimension: shape {x.shape}.")
    return x


def _check_inputs(q, k, v, enable_gqa: bool) -> None:
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(
            "`query`, `key` and `value` must have the same dtype, got "
            f"query {q.dtype}, key {k.dtype}, value {v.dtype}."
        )
    if q.dtype not in _DTYPES:
        raise TypeError(
            f"`query`, `key` and `value` have dtype {q.dtype}: flex_attention takes "
            "float16, bfloat16, float32 or float64 inputs."
        )
    if not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise ValueError(
            "`query`, `key` and `value` must have the same batch size, got shapes "
            f"query {q.shape}, key {k.shape}, value {v.shape}."
        )
    if k.shape[1:3] != v.shape[1:3]:
        raise ValueError(
            "`key` and `value` must have the same number of heads and length, got "
            f"key {k.shape} and value {v.shape}."
        )
    if q.shape[3] != k.shape[3]:
        raise ValueError(
            "`query` and `key` must have the same head dimension, got "
            f"query {q.shape} (D={q.shape[3]}) and key {k.shape} (D={k.shape[3]})."
        )
    hq, hkv = q.shape[1], k.shape[1]
    if not enable_gqa and hq != hkv:
        raise ValueError(
            f"`query` has Hq={hq} heads but `key`/`value` have Hkv={hkv}: set "
            "enable_gqa=True for grouped-query attention."
        )
    if hq % hkv:
        raise ValueError(
            f"For grouped-query attention the number of query heads Hq={hq} must be "
            f"a multiple of the number of key/value heads Hkv={hkv}."
        )


def _check_block_mask(bm: Any, b: int, hq: int, lq: int, lkv: int) -> None:
    if not isinstance(bm, BlockMask):
        raise TypeError(
            f"`block_mask` must be a BlockMask (see create_block_mask), got "
            f"{type(bm).__name__}."
        )
    if bm.seq_lengths != (lq, lkv):
        raise ValueError(
            f"`block_mask` was built for (Lq, Lkv)={bm.seq_lengths} (shape "
            f"{bm.shape}), but query and key have Lq={lq}, Lkv={lkv}. Build one "
            "for these lengths with create_block_mask, or crop a longer one with "
            "`block_mask.adjust(Lq, Lkv)`."
        )
    mb, mh = bm.kv_num_blocks.shape[:2]
    if mb not in (1, b) or mh not in (1, hq):
        raise ValueError(
            f"`block_mask` has shape {bm.shape}; its batch and head sizes must be 1 "
            f"or match query's B={b}, Hq={hq}."
        )


def _check_scale(scale: Any, d: int) -> tuple[float, Array | None]:
    """`(static_scale, array_scale)`: a Python number is static (part of the
    compiled program); a JAX scalar (a learnable temperature, or a value traced by
    `jax.jit`) is data, returned as `array_scale` with `static_scale` 1."""
    if scale is None:
        return 1.0 / math.sqrt(d), None
    if isinstance(scale, bool):
        raise TypeError("`scale` must be a number, a scalar array or None, got bool.")
    if isinstance(scale, numbers.Real):
        return float(scale), None
    if isinstance(scale, jax.Array | np.ndarray | np.generic):
        if jnp.shape(scale) != ():
            raise ValueError(
                f"`scale` must be a scalar, got an array of shape {jnp.shape(scale)}."
            )
        dtype = jnp.result_type(scale)
        if not (
            jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)
        ):
            raise TypeError(f"`scale` must be real, got dtype {dtype}.")
        if not isinstance(scale, jax.Array):  # numpy: a constant
            return float(scale), None
        return 1.0, scale
    raise TypeError(
        "`scale` must be a Python number, a scalar array or None, got "
        f"{type(scale).__name__}."
    )


# How to compile flex_attention, said wherever a user gets it wrong.
COMPILE_HINT = (
    "Compile it with `eqx.filter_jit(fa.flex_attention)` (arrays traced, everything "
    "else static), or `jax.jit(fa.flex_attention, static_argnames=('score_mod', "
    "'return_lse', 'enable_gqa', 'backend'))` (drop 'score_mod' when it is an "
    "eqx.Module, which jit takes as data; a `kernel_options` dict can't be static: "
    "pass it inside your own function), or call flex_attention inside a function "
    "you jit."
)


def _is_traced(tree: Any) -> bool:
    return any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(tree))


def _check_flag(name: str, value: Any) -> bool:
    """A static bool argument: a traced value means `jax.jit` traced it."""
    if _is_traced(value):
        raise TypeError(
            f"flex_attention: `{name}` is a traced value, but it decides what is "
            "computed and must be a Python bool. A bare `jax.jit(fa.flex_attention)` "
            f"traces every argument it is given. {COMPILE_HINT}"
        )
    if isinstance(value, bool | np.bool_):
        return bool(value)
    raise TypeError(f"`{name}` must be a bool, got {type(value).__name__}.")


def _check_static_options(kernel_options: Any) -> None:
    if _is_traced(kernel_options):
        raise TypeError(
            "flex_attention: `kernel_options` holds traced values, but options are "
            "static (they choose the compiled program). A bare "
            f"`jax.jit(fa.flex_attention)` traces every argument it is given. "
            f"{COMPILE_HINT}"
        )


_warned_eager = False


def _internal_dirs() -> tuple[str, ...]:
    """Where the frames the eager warning skips live: this package, JAX's and
    Equinox's transformations, and the wrappers of runtime type checking."""
    names = (__package__, "jax", "equinox", "jaxtyping", "beartype")
    modules = [sys.modules.get(n) for n in names]
    return tuple(
        os.path.dirname(m.__file__) + os.sep
        for m in modules
        if getattr(m, "__file__", None)
    )


def _warn_if_eager() -> None:
    """Warns once per process when flex_attention runs outside any trace."""
    global _warned_eager
    if _warned_eager:
        return
    if isinstance(jnp.zeros(()), jax.core.Tracer):  # inside jit, eval_shape, ...
        return
    _warned_eager = True
    internal = _internal_dirs()
    stacklevel = 1  # the first frame outside this package and type-check wrappers
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(internal):
        frame, stacklevel = frame.f_back, stacklevel + 1
    warnings.warn(
        "flex_attention ran eagerly (outside jax.jit): JAX then runs its blockwise "
        "loops op by op, typically 10x slower or more than compiled. "
        f"{COMPILE_HINT} (This warning is shown once per process.)",
        UserWarning,
        stacklevel=stacklevel + 1,
    )


@eqx.filter_custom_vjp
def _fused(problem: AttentionProblem, backend: AbstractBackend):
    return _partitioned.forward(backend, problem)


@_fused.def_fwd
def _fused_fwd(perturbed, problem, backend):
    del perturbed
    out, lse = _partitioned.forward(backend, problem)
    return (out, lse), (out, lse)


@_fused.def_bwd
def _fused_bwd(residuals, grads, perturbed, problem, backend):
    _check_not_reverse_differentiated(residuals, grads, problem, backend)
    out, lse = residuals
    dout, dlse = grads
    return _partitioned.backward(backend, problem, out, lse, dout, dlse, perturbed)


try:  # JAX's reverse mode linearizes with these tracers (not forward mode's)
    from jax._src.core import is_concrete as _is_concrete
    from jax._src.interpreters.ad import LinearizeTracer as _LinearizeTracer
except ImportError:  # pragma: no cover - other JAX versions: JAX's own error
    _LinearizeTracer = None

try:  # forward mode (`jax.jvp`) traces with these; reverse mode does not
    from jax._src.interpreters.ad import JVPTracer as _JVPTracer
    from jax._src.interpreters.partial_eval import JaxprTracer as _JaxprTracer
except ImportError:  # pragma: no cover - other JAX versions: caught when raised
    _JVPTracer = None


def _in_forward_mode(problem: AttentionProblem) -> bool:
    """Whether forward-mode autodiff traces this call: a JVP tracer whose tangent is
    not being partially evaluated (that is reverse mode's older linearization), or
    `jax.linearize`'s tracer (its linear function runs forwards; `jax.vjp` and
    `jax.grad` use the same tracer with `is_vjp` set)."""
    leaves = jax.tree_util.tree_leaves(problem)
    if _LinearizeTracer is not None and any(
        isinstance(x, _LinearizeTracer) and getattr(x._trace, "is_vjp", True) is False
        for x in leaves
    ):
        return True
    if _JVPTracer is None:
        return False
    return any(
        isinstance(x, _JVPTracer) and not isinstance(x.tangent, _JaxprTracer)
        for x in leaves
    )


def _check_not_reverse_differentiated(residuals, grads, problem, backend) -> None:
    """A backward pass that is itself being differentiated in reverse mode (the
    outer `jax.grad` of a `jax.grad`) under `jit` fails deep inside JAX: the kernel
    loops run for a number of blocks known only at run time, and JAX cannot reverse
    such loops. Say so, and what works, instead."""
    if _LinearizeTracer is None:
        return
    leaves = jax.tree_util.tree_leaves((residuals, grads, problem))
    if not any(isinstance(x, _LinearizeTracer) for x in leaves):
        return
    bounds = jax.tree_util.tree_leaves(problem.block_mask)
    if all(_is_concrete(x) for x in bounds):
        return  # outside jit the loops have static lengths and reverse fine
    raise NotImplementedError(
        "flex_attention: reverse-mode differentiation of its gradient (`jax.grad` "
        f"of `jax.grad`) under `jax.jit` is not supported by the {backend.name!r} "
        "backend: its backward pass loops over a number of blocks known only at run "
        "time, which JAX cannot differentiate in reverse. What works: the same "
        "outside `jit`; forward-over-reverse (`jax.hessian`, `jax.jacfwd` or "
        "`jax.jvp` of `jax.grad`), also under `jit`; or `backend='reference'` "
        "(dense, O(Lq * Lkv) memory)."
    )


def _problem(
    query, key, value, score_mod, block_mask, scale, enable_gqa, kernel_options
) -> AttentionProblem:
    q = _check_array("query", query)
    k = _check_array("key", key)
    v = _check_array("value", value)
    _check_inputs(q, k, v, enable_gqa)
    b, hq, lq, d = q.shape
    lkv = k.shape[2]
    if block_mask is None:
        block_mask = full_block_mask(lq, lkv)
    else:
        _check_block_mask(block_mask, b, hq, lq, lkv)
    check_mod_shape(block_mask.mask_mod, b, hq, lq, lkv)
    if score_mod is not None:
        check_mod_shape(score_mod, b, hq, lq, lkv)
    acc = accumulator_dtype(q.dtype)
    static_scale, array_scale = _check_scale(scale, d)
    if array_scale is not None:  # data: scale q (exact for the scores, and its
        # gradient comes from JAX's autodiff of this product)
        q = (q.astype(acc) * array_scale.astype(acc)).astype(q.dtype)
    _check_static_options(kernel_options)
    return AttentionProblem(
        q=q,
        k=k,
        v=v,
        score_mod=None if score_mod is None else convert_score_mod(score_mod, acc),
        mask_mod=convert_mask_mod(block_mask.mask_mod),
        block_mask=block_mask,
        scale=static_scale,
        kernel_options=normalise_options(kernel_options),
    )


def flex_attention(
    query: Float[Array | np.ndarray, "b hq lq d"],
    key: Float[Array | np.ndarray, "b hkv lkv d"],
    value: Float[Array | np.ndarray, "b hkv lkv dv"],
    score_mod: Callable | None = None,
    block_mask: BlockMask | None = None,
    *,
    scale: float | int | Array | None = None,
    enable_gqa: bool = False,
    return_lse: bool = False,
    backend: str = "auto",
    kernel_options: dict[str, Any] | None = None,
    return_aux: AuxRequest | None = None,
) -> (
    Float[Array, "b hq lq dv"]
    | tuple[Float[Array, "b hq lq dv"], Float[Array, "b hq lq"]]
    | tuple[Float[Array, "b hq lq dv"], AuxOutput]
):
    """Attention with a user-defined score mod and a block-sparse mask.

    Computes `softmax(where(mask, score_mod(q k^T * scale, b, h, q_idx, kv_idx),
    -inf)) v` in one fused, blockwise pass that never forms the `Lq x Lkv` matrix, with
    the semantics of PyTorch's `torch.nn.attention.flex_attention`.

    **Arguments:**

    - `query`: `(B, Hq, Lq, D)`.
    - `key`: `(B, Hkv, Lkv, D)`.
    - `value`: `(B, Hkv, Lkv, Dv)`.
    - `score_mod`: `score_mod(score, b, h, q_idx, kv_idx) -> score`, written for
        scalars (`b`, `h`, `q_idx`, `kv_idx` are int32; `h` is the query head). A
        function, or an `eqx.Module` whose inexact arrays (ALiBi slopes, bias
        tables) receive gradients. Arrays a function closes over get gradients too.
    - `block_mask`: a [`BlockMask`][eqx_flexattn.BlockMask] from
        [`create_block_mask`][eqx_flexattn.create_block_mask] built for
        `(Lq, Lkv)`; `None` attends everywhere.
    - `scale`: multiplies `q k^T` before `score_mod`; default `1 / sqrt(D)`. A
        Python number is static; a JAX scalar is data (a learnable temperature: it
        receives a gradient, and new values never recompile).
    - `enable_gqa`: allow `Hq` to be a multiple of `Hkv` (query head `h` reads key
        head `h // (Hq // Hkv)`).
    - `return_lse`: also return the log-sum-exp of the scores (natural log).
    - `backend`: `"auto"`, `"xla"` or `"reference"` (dense, for testing).
    - `kernel_options`: tuning hints. Flat keys go to every backend that has that
        option (others ignore them): `{"row_groups": 4}`; a backend's name targets
        that backend only and wins over flat keys: `{"xla": {"row_groups": 4}}`;
        `"interpret": True` runs Pallas kernel backends in interpret mode. PyTorch
        FlexAttention's keys are accepted: `BLOCK_M`/`BLOCK_N` (query/key tile),
        `num_warps`, `num_stages` go to backends with that option, and any that a
        backend ignores is noted once (a `UserWarning`). Any other key raises
        `ValueError`.
    - `return_aux`: PyTorch's (>= 2.9) form, `AuxRequest(lse=True, max_scores=True)`:
        then returns `(out, AuxOutput(lse, max_scores))`, fields `None` unless
        requested. `max_scores` is each row's largest score after `score_mod` and
        masking (`-inf` for a fully masked row), computed by an extra pass a query
        block at a time, and not differentiated. Don't combine with `return_lse`.

    **Returns:** the output `(B, Hq, Lq, Dv)` in the dtype of `query`; with
    `return_lse=True`, also `lse (B, Hq, Lq)` in float32 (float64 for float64
    inputs). Fully masked rows give output 0 and lse `-inf`.

    **Compiling.** Call it inside `jax.jit`, or compile it directly with
    `eqx.filter_jit(fa.flex_attention)` (the counterpart of
    `torch.compile(flex_attention)`). A bare `jax.jit(fa.flex_attention)` cannot work:
    it traces every argument, and `return_lse`, `enable_gqa`, `backend`, a
    plain-function `score_mod` and `kernel_options` must stay Python values; use
    `jax.jit(fa.flex_attention, static_argnames=("score_mod", "return_lse",
    "enable_gqa", "backend"))` if you prefer `jax.jit`. Run outside any trace, JAX
    executes it op by op (often 10x slower or more): a `UserWarning` says so once
    per process. A plain-function `score_mod` is static: a new closure per call
    recompiles per call (a `UserWarning` says so once, at the third such trace);
    make it an `eqx.Module`, or build it inside the function you jit.

    **Sharding.** Under `jit`, inputs sharded over batch and/or heads run the
    backend per shard, and the output keeps their sharding: on `Explicit` mesh axes
    through `shard_map`, on `Auto` axes through the kernels' partitioning rule (the
    `xla` backend is partitioned by XLA). Sharding the sequence is
    `eqx_flexattn.context_parallel.flex_attention`'s work.

    **Differentiation.** Reverse mode (`jax.grad`, `jax.vjp`) runs the backend's
    fused backward pass. Forward mode (`jax.jvp`, `jax.jacfwd`, `jax.linearize`)
    differentiates the `xla` backend's blockwise forward pass (`backend="auto"` or
    `"xla"`; O(L) memory), or the dense `backend="reference"`; the Pallas kernel
    backends have no forward-mode rule.
    Second derivatives: forward-over-reverse (`jax.hessian`) works everywhere;
    reverse-over-reverse (`jax.grad` of `jax.grad`) only outside `jit`, or with
    `backend="reference"`.

    !!! Example

        ```python
        import eqx_flexattn as fa

        bm = fa.create_block_mask(fa.masks.causal_mask, None, None, 1024, 1024)
        alibi = fa.score_mods.generate_alibi_bias(8)
        out = fa.flex_attention(q, k, v, score_mod=alibi, block_mask=bm)
        ```
    """
    enable_gqa = _check_flag("enable_gqa", enable_gqa)
    return_lse = _check_flag("return_lse", return_lse)
    aux = _check_aux(return_aux, return_lse)
    _warn_if_eager()
    shards = None if aux is not None else _sharded_axes(query, key, value)
    if shards is not None:  # each device runs its kernel on its shard
        from ._context_parallel import sharded_attention

        return sharded_attention(
            query, key, value, score_mod, block_mask, mesh=shards[0],
            axis_name=None, batch_axis=shards[1], head_axis=shards[2], scale=scale,
            enable_gqa=enable_gqa, return_lse=return_lse, backend=backend,
            kernel_options=kernel_options, strategy="auto", layout="natural",
        )  # fmt: skip
    problem = _problem(
        query, key, value, score_mod, block_mask, scale, enable_gqa, kernel_options
    )
    note_traced_mods(
        {"score_mod": score_mod, "mask_mod": problem.block_mask.mask_mod},
        tuple((x.shape, x.dtype) for x in (problem.q, problem.k, problem.v)),
    )
    impl, _ = select_backend(backend, problem)
    if impl.differentiable:
        out, lse = impl.forward(problem)
    elif _in_forward_mode(problem):
        out, lse = _forward_mode(problem, impl, backend, None)
    else:
        try:
            out, lse = _fused(problem, impl)
        except TypeError as e:
            if "forward-mode autodiff" not in str(e):
                raise
            out, lse = _forward_mode(problem, impl, backend, e)
    if aux is not None:
        return out, AuxOutput(
            lse=lse if aux.lse else None,
            max_scores=max_scores(problem) if aux.max_scores else None,
        )
    return (out, lse) if return_lse else out


def _sharded_axes(*arrays) -> tuple[Any, str | None, str | None] | None:
    """`(mesh, batch_axis, head_axis)` when q, k and v are sharded over batch and/or
    heads on `Explicit` mesh axes (their type says so; `Auto` axes say nothing), and
    nowhere else: then `shard_map` runs the backend per shard. Otherwise `None`."""
    typeof = getattr(jax, "typeof", None)
    if typeof is None:
        return None
    specs = []
    for x in arrays:
        sharding = getattr(typeof(x), "sharding", None)
        spec = getattr(sharding, "spec", None)
        if spec is None:
            return None
        spec = tuple(spec) + (None,) * (4 - len(spec))
        specs.append(spec)
    mesh = typeof(arrays[0]).sharding.mesh
    explicit = {
        n for n, t in zip(mesh.axis_names, mesh.axis_types) if "Explicit" in str(t)
    }
    (b, h, lq, d), *others = specs
    if not (b or h) or lq or d:
        return None
    if any(o[:2] != (b, h) or o[2] or o[3] for o in others):
        return None
    for axis in (b, h):
        if axis is not None and not (isinstance(axis, str) and axis in explicit):
            return None
    return mesh, b, h


_AUX_FIELDS = AuxRequest._fields


def _check_aux(return_aux: Any, return_lse: bool) -> AuxRequest | None:
    if return_aux is None:
        return None
    if _is_traced(return_aux):
        raise TypeError(
            "flex_attention: `return_aux` holds traced values, but must hold Python "
            f"bools. {COMPILE_HINT}"
        )
    if not isinstance(return_aux, AuxRequest):
        raise TypeError(
            "`return_aux` must be an `AuxRequest(lse=..., max_scores=...)` (from "
            f"eqx_flexattn), got {type(return_aux).__name__}."
        )
    if return_lse:
        raise ValueError(
            "Pass either `return_lse=True` or `return_aux=AuxRequest(lse=True)`, not "
            "both."
        )
    return AuxRequest(
        *(_check_flag(f"return_aux.{n}", getattr(return_aux, n)) for n in _AUX_FIELDS)
    )


def _forward_mode(problem, impl, backend, error):
    """Forward-mode autodiff (`jax.jvp`) reached the `custom_vjp`, which JAX cannot
    differentiate forwards: differentiate the `xla` backend's forward pass itself
    (its loops are `lax` loops, fine in forward mode), or say what works."""
    xla = _backends.BACKENDS.get("xla")
    if backend in ("auto", "xla") and xla is not None:
        try:
            xla.check(problem)
        except NotImplementedError:
            pass
        else:
            return xla.forward(problem)
    raise TypeError(
        f"flex_attention: forward-mode differentiation (`jax.jvp`, `jax.jacfwd`) "
        f"is not available with backend={backend!r}: its kernel defines only a "
        "reverse-mode rule (`custom_vjp`). Use backend='xla' (blockwise, O(L) "
        "memory) or backend='reference' (dense) for forward mode, or reverse mode "
        "(`jax.grad`, `jax.vjp`)."
    ) from error


def explain_backend(
    query: Float[Array | np.ndarray, "b hq lq d"] | jax.ShapeDtypeStruct,
    key: Float[Array | np.ndarray, "b hkv lkv d"] | jax.ShapeDtypeStruct,
    value: Float[Array | np.ndarray, "b hkv lkv dv"] | jax.ShapeDtypeStruct,
    score_mod: Callable | None = None,
    block_mask: BlockMask | None = None,
    *,
    scale: float | int | None = None,
    enable_gqa: bool = False,
    backend: str = "auto",
    kernel_options: dict[str, Any] | None = None,
) -> str:
    """Which backend `flex_attention` would run with these arguments, and why; and
    what every other registered backend would do with them.

    Takes the arguments of [`flex_attention`][eqx_flexattn.flex_attention]; `query`,
    `key` and `value` may be `jax.ShapeDtypeStruct`s. Computes nothing.

    **Returns:** lines of text: `backend: NAME` (the one that runs; `backend: none`
    when `flex_attention` would raise instead: the backend asked for by name, or
    every backend `auto` tries, declines), then `declined: NAME: reason` for each
    backend tried first (or asked for), then `other: NAME: ...` for every remaining
    registered backend: whether it accepts these inputs (and how to select it) or
    why it declines. Every reason names the backend and what it needs.

    !!! Example

        ```python
        print(fa.explain_backend(q, k, v, block_mask=bm))
        # backend: xla
        # declined: mosaic: it needs an NVIDIA GPU of compute capability 9.0 ...
        # other: reference: accepts these inputs; not tried by auto (...)
        ```
    """
    found = []

    def choose(q, k, v):
        problem = _problem(
            q, k, v, score_mod, block_mask, scale, enable_gqa, kernel_options
        )
        try:
            impl, reasons = select_backend(backend, problem)
        except NotImplementedError:  # say why, as for a backend that runs
            tried = _backends.AUTO_ORDER if backend == "auto" else (backend,)
            impl, reasons = None, [_declines(n, problem) for n in tried]
        found.append((impl, reasons, _others(problem, impl, reasons)))

    jax.eval_shape(choose, query, key, value)
    impl, reasons, others = found[0]
    if impl is None:
        first = (
            f"backend: none (flex_attention(..., backend={backend!r}) raises "
            "NotImplementedError)"
        )
    else:
        first = f"backend: {impl.name}"
    lines = [first] + [f"declined: {r}" for r in reasons]
    return "\n".join(lines + [f"other: {o}" for o in others])


def _declines(name: str, problem) -> str:
    """`NAME: reason` of a backend that declines `problem`."""
    try:
        _backends.BACKENDS[name].check(problem)
    except NotImplementedError as e:
        return f"{name}: {e}"
    raise AssertionError(f"backend {name!r} accepts the problem it declined")


def _others(problem, chosen, reasons) -> list[str]:
    """What each registered backend not yet reported would do with `problem`."""
    declined = {r.split(":", 1)[0] for r in reasons}
    lines = []
    for name, candidate in _backends.BACKENDS.items():
        if (chosen is not None and name == chosen.name) or name in declined:
            continue
        try:
            candidate.check(problem)
        except (NotImplementedError, ValueError) as e:
            lines.append(f"{name}: declines: {e}")
            continue
        if name in _backends.AUTO_ORDER:
            after = "" if chosen is None else f" after {chosen.name!r}"
            how = f"`auto` tries it{after}"
        else:
            how = "not tried by `auto`"
        lines.append(f"{name}: accepts these inputs; {how} (backend={name!r})")
    return lines
