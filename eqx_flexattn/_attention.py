"""`flex_attention`: input checks, backend dispatch and the custom-VJP wiring."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from ._backends import AbstractBackend, AttentionProblem, select_backend
from ._backends._base import accumulator_dtype
from ._backends._config import normalise_options
from ._block_mask import BlockMask, full_block_mask
from ._mods import check_mod_shape, convert_mask_mod, convert_score_mod


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


def _check_scale(scale: Any, d: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(d)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(
            f"`scale` must be a Python number or None, got {type(scale).__name__}."
        )
    return float(scale)




@eqx.filter_custom_vjp
def _fused(problem: AttentionProblem, backend: AbstractBackend):
    return backend.forward(problem)


@_fused.def_fwd
def _fused_fwd(perturbed, problem, backend):
    del perturbed
    out, lse = backend.forward(problem)
    return (out, lse), (out, lse)


@_fused.def_bwd
def _fused_bwd(residuals, grads, perturbed, problem, backend):
    _check_not_reverse_differentiated(residuals, grads, problem, backend)
    out, lse = residuals
    dout, dlse = grads
    return backend.backward(problem, out, lse, dout, dlse, perturbed)


try:  # JAX's reverse mode linearizes with these tracers (not forward mode's)
    from jax._src.core import is_concrete as _is_concrete
    from jax._src.interpreters.ad import LinearizeTracer as _LinearizeTracer
except ImportError:  # pragma: no cover - other JAX versions: JAX's own error
    _LinearizeTracer = None


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
    return AttentionProblem(
        q=q,
        k=k,
        v=v,
        score_mod=None if score_mod is None else convert_score_mod(score_mod, acc),
        mask_mod=convert_mask_mod(block_mask.mask_mod),
        block_mask=block_mask,
        scale=_check_scale(scale, d),
        kernel_options=normalise_options(kernel_options),
    )


def flex_attention(
    query: Float[Array | np.ndarray, "b hq lq d"],
    key: Float[Array | np.ndarray, "b hkv lkv d"],
    value: Float[Array | np.ndarray, "b hkv lkv dv"],
    score_mod: Callable | None = None,
    block_mask: BlockMask | None = None,
    *,
    scale: float | int | None = None,
    enable_gqa: bool = False,
    return_lse: bool = False,
    backend: str = "auto",
    kernel_options: dict[str, Any] | None = None,
) -> (
    Float[Array, "b hq lq dv"]
    | tuple[Float[Array, "b hq lq dv"], Float[Array, "b hq lq"]]
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
    - `scale`: multiplies `q k^T` before `score_mod`; default `1 / sqrt(D)`.
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

    **Returns:** the output `(B, Hq, Lq, Dv)` in the dtype of `query`; with
    `return_lse=True`, also `lse (B, Hq, Lq)` in float32 (float64 for float64
    inputs). Fully masked rows give output 0 and lse `-inf`.

    Call it inside `jax.jit` (or `eqx.filter_jit`); outside, JAX runs it op by op.
    It is differentiable in reverse mode (`jax.grad`); the kernel backends define a
    `custom_vjp`, so forward mode (`jax.jvp`) needs `backend="reference"`.
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
    problem = _problem(
        query, key, value, score_mod, block_mask, scale, enable_gqa, kernel_options
    )
    impl, _ = select_backend(backend, problem)
    if impl.differentiable:
        out, lse = impl.forward(problem)
    else:
        out, lse = _fused(problem, impl)
    return (out, lse) if return_lse else out


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
    """Which backend `flex_attention` would run with these arguments, and why.

    Takes the arguments of [`flex_attention`][eqx_flexattn.flex_attention]; `query`,
    `key` and `value` may be `jax.ShapeDtypeStruct`s. Computes nothing.
    """
    found = []

    def choose(q, k, v):
        problem = _problem(
            q, k, v, score_mod, block_mask, scale, enable_gqa, kernel_options
        )
        found.append(select_backend(backend, problem))

    jax.eval_shape(choose, query, key, value)
    impl, reasons = found[0]
    lines = [f"backend: {impl.name}"] + [f"declined: {r}" for r in reasons]
    return "\n".join(lines)
