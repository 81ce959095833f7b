"""`merge_attention`: the exact combination of attention over disjoint key sets."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ._backends._base import accumulator_dtype


def _stack(x, name: str) -> Array:
    if isinstance(x, jax.Array):
        return x
    if not isinstance(x, Sequence) or not x:
        raise TypeError(
            f"`{name}` must be a non-empty sequence of arrays or one stacked array, "
            f"got {type(x).__name__}."
        )
    return jnp.stack([jnp.asarray(y) for y in x])


def merge_attention(
    outs: Sequence[Float[Array, "*batch l dv"]] | Float[Array, "n *batch l dv"],
    lses: Sequence[Float[Array, "*batch l"]] | Float[Array, "n *batch l"],
) -> tuple[Float[Array, "*batch l dv"], Float[Array, "*batch l"]]:
    """Merges attention computed over disjoint sets of keys into attention over
    their union, exactly.

    Part `i` attends to its own keys and returns `(outs[i], lses[i])`, as
    [`flex_attention`][eqx_flexattn.flex_attention] with `return_lse=True` does.
    Attention over all keys is then `out = sum_i exp(lse_i - lse) outs[i]` with
    `lse = logsumexp_i lse_i`: what ring attention, split-KV decoding and a KV cache
    split into pages do.

    **Arguments:**

    - `outs`: a sequence of `n` outputs `(..., L, Dv)`, or one array `(n, ..., L, Dv)`.
    - `lses`: their log-sum-exps `(..., L)` (natural log), likewise.

    **Returns:** `(out, lse)`: `out` in the dtype of `outs` (accumulated in float32,
    float64 for float64 inputs), `lse` in float32 (float64). A row that every part
    masks fully (all `lse_i = -inf`) gives output 0 and `lse = -inf`.

    Differentiable in `outs` and `lses` (reverse and forward mode), without NaN for
    fully masked parts.

    !!! Example

        ```python
        o1, l1 = fa.flex_attention(q, k[:, :, :512], v[:, :, :512], return_lse=True)
        o2, l2 = fa.flex_attention(q, k[:, :, 512:], v[:, :, 512:], return_lse=True)
        out, lse = fa.merge_attention([o1, o2], [l1, l2])   # attention over all of k
        ```
    """
    outs = _stack(outs, "outs")
    lses = _stack(lses, "lses")
    if outs.shape[:-1] != lses.shape:
        raise ValueError(
            "merge_attention: `outs` must be `lses` with one more (last) axis, got "
            f"outs {outs.shape} and lses {lses.shape}."
        )
    if not (
        jnp.issubdtype(outs.dtype, jnp.floating)
        and jnp.issubdtype(lses.dtype, jnp.floating)
    ):
        raise TypeError(
            f"merge_attention takes floating arrays, got outs {outs.dtype} and lses "
            f"{lses.dtype}."
        )
    acc = accumulator_dtype(outs.dtype)
    lses = lses.astype(jnp.promote_types(lses.dtype, acc))
    m = jnp.max(lses, axis=0)
    m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
    weights = jnp.exp(lses - m)  # 0 for a fully masked part, and so its gradient
    total = jnp.sum(weights, axis=0)
    nonempty = total > 0
    total = jnp.where(nonempty, total, 1.0)
    lse = jnp.where(nonempty, m + jnp.log(total), -jnp.inf)
    weights = (weights / total).astype(acc)
    out = jnp.sum(weights[..., None] * outs.astype(acc), axis=0)
    return out.astype(outs.dtype), lse
