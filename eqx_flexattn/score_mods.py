"""Ready-made score mods: `score_mod(score, b, h, q_idx, kv_idx) -> score`.

Those with parameters are `eqx.Module`s whose floating-point arrays are learnable:
`flex_attention` returns their gradients from its fused backward pass, so they train
inside Equinox models like any other layer. Chain several with [`compose`][].

!!! Example

    ```python
    from eqx_flexattn.score_mods import SoftCap, compose, generate_alibi_bias

    mod = compose(generate_alibi_bias(8), SoftCap(30.0))
    out = flex_attention(q, k, v, score_mod=mod, block_mask=bm)
    ```
"""

from __future__ import annotations

import math
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from ._mods import check_mod_shape, require_size


__all__ = [
    "Alibi",
    "generate_alibi_bias",
    "SoftCap",
    "RelativePositionBias",
    "T5RelativeBias",
    "HeadBias",
    "Composed",
    "compose",
    "checkerboard",
]


def _parameter(x) -> Array:
    """A learnable array in a concrete float dtype: float32 unless already floating,
    and never weakly typed. (A weak-typed parameter becomes strong after its first
    optimiser update, so a jitted training step would compile twice.)"""
    x = jnp.asarray(x)
    dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32
    return jax.lax.convert_element_type(x, dtype)  # strips the weak type


class Alibi(eqx.Module):
    """ALiBi: `score + slopes[h] * (kv_idx - q_idx)`, with learnable `slopes (H,)`.

    `slopes` are stored in a concrete float dtype (float32 unless given floating)."""

    slopes: Float[Array, " heads"] = eqx.field(converter=_parameter)

    def __call__(self, score, b, h, q_idx, kv_idx):
        return score + self.slopes[h] * (kv_idx - q_idx)

    def check_shape(self, B: int, Hq: int, Lq: int, Lkv: int) -> None:
        """One slope per query head (not per key/value head under GQA)."""
        require_size(self, "slopes", 0, self.slopes.shape[0], "Hq", Hq)


def alibi_slopes(num_heads: int) -> Float[Array, " heads"]:
    """The standard geometric ALiBi slopes `2 ** (-8 (h + 1) / num_heads)`."""
    if not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"`num_heads` must be a positive int, got {num_heads!r}.")
    return jnp.exp2(-8.0 * (jnp.arange(num_heads, dtype=jnp.float32) + 1) / num_heads)


def generate_alibi_bias(num_heads: int) -> Alibi:
    """ALiBi with the standard slopes `2 ** (-8 (h + 1) / num_heads)` (learnable)."""
    return Alibi(alibi_slopes(num_heads))


class SoftCap(eqx.Module):
    """Tanh soft-capping of the scores: `cap * tanh(score / cap)` (Gemma 2, Grok)."""

    cap: float = eqx.field(static=True)

    def __init__(self, cap: float | int):
        if not cap > 0:
            raise ValueError(f"`cap` must be positive, got {cap!r}.")
        self.cap = float(cap)

    def __call__(self, score, b, h, q_idx, kv_idx):
        return self.cap * jnp.tanh(score / self.cap)


def _bias_table(shape, table, key, dtype) -> Array:
    """`table` if given (checked against `shape`), else zeros, or small random values
    when `key` is given."""
    if table is None:
        if key is None:
            return jnp.zeros(shape, dtype)
        return 0.02 * jax.random.normal(key, shape, dtype)
    table = _parameter(table)
    if table.shape != shape:
        raise ValueError(f"`table` must have shape {shape}, got {table.shape}.")
    return table


class RelativePositionBias(eqx.Module):
    """Learnable relative-position bias `score + table[h, clip(kv_idx - q_idx)]`.

    `table` has shape `(H, 2 * max_distance - 1)`; entry `max_distance - 1 + r` is the
    bias at relative position `r = kv_idx - q_idx`, clipped to
    `[-(max_distance - 1), max_distance - 1]`.
    """

    table: Float[Array, "heads distances"]
    max_distance: int = eqx.field(static=True)

    def __init__(
        self,
        num_heads: int,
        max_distance: int,
        *,
        key: PRNGKeyArray | None = None,
        table: Float[Array, "heads distances"] | None = None,
        dtype=jnp.float32,
    ):
        """**Arguments:** `num_heads`, `max_distance`; `table` to set it, otherwise
        zeros, or small random values when `key` is given."""
        if not isinstance(max_distance, int) or max_distance < 1:
            raise ValueError(
                f"`max_distance` must be a positive int, got {max_distance!r}."
            )
        self.table = _bias_table((num_heads, 2 * max_distance - 1), table, key, dtype)
        self.max_distance = max_distance

    def __call__(self, score, b, h, q_idx, kv_idx):
        r = jnp.clip(kv_idx - q_idx, 1 - self.max_distance, self.max_distance - 1)
        return score + self.table[h, r + self.max_distance - 1]

    def check_shape(self, B: int, Hq: int, Lq: int, Lkv: int) -> None:
        """One table row per query head."""
        require_size(self, "table", 0, self.table.shape[0], "Hq", Hq)


def t5_bucket(
    relative_position, num_buckets: int, max_distance: int, bidirectional: bool
):
    """T5's bucket of `relative_position = kv_idx - q_idx`: exact for small
    distances, logarithmic up to `max_distance`."""
    ret = jnp.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        ret = ret + (relative_position > 0) * num_buckets
        n = jnp.abs(relative_position)
    else:
        n = jnp.maximum(-relative_position, 0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    n_safe = jnp.maximum(n, max_exact).astype(jnp.float32)
    large = max_exact + (
        jnp.log(n_safe / max_exact)
        / math.log(max_distance / max_exact)
        * (num_buckets - max_exact)
    ).astype(relative_position.dtype)
    large = jnp.minimum(large, num_buckets - 1)
    return ret + jnp.where(is_small, n, large)


class T5RelativeBias(eqx.Module):
    """T5's bucketed relative-position bias: `score + table[h, bucket(kv - q)]`.

    `table (H, num_buckets)` is learnable.
    """

    table: Float[Array, "heads buckets"]
    num_buckets: int = eqx.field(static=True)
    max_distance: int = eqx.field(static=True)
    bidirectional: bool = eqx.field(static=True)

    def __init__(
        self,
        num_heads: int,
        num_buckets: int = 32,
        max_distance: int = 128,
        bidirectional: bool = True,
        *,
        key: PRNGKeyArray | None = None,
        table: Float[Array, "heads buckets"] | None = None,
        dtype=jnp.float32,
    ):
        self.table = _bias_table((num_heads, num_buckets), table, key, dtype)
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.bidirectional = bidirectional

    def __call__(self, score, b, h, q_idx, kv_idx):
        bucket = t5_bucket(
            kv_idx - q_idx, self.num_buckets, self.max_distance, self.bidirectional
        )
        return score + self.table[h, bucket]

    def check_shape(self, B: int, Hq: int, Lq: int, Lkv: int) -> None:
        """One table row per query head."""
        require_size(self, "table", 0, self.table.shape[0], "Hq", Hq)


class HeadBias(eqx.Module):
    """A learnable per-head (shape `(H,)`) or global (shape `()`) additive bias, in a
    concrete float dtype (float32 unless given floating)."""

    bias: Float[Array, "*heads"] = eqx.field(converter=_parameter)

    def __call__(self, score, b, h, q_idx, kv_idx):
        return score + (self.bias[h] if self.bias.ndim else self.bias)

    def check_shape(self, B: int, Hq: int, Lq: int, Lkv: int) -> None:
        """A per-head bias has one entry per query head."""
        if self.bias.ndim:
            require_size(self, "bias", 0, self.bias.shape[0], "Hq", Hq)


class Composed(eqx.Module):
    """Applies several score mods in order."""

    mods: tuple[Callable, ...]

    def __call__(self, score, b, h, q_idx, kv_idx):
        for mod in self.mods:
            score = mod(score, b, h, q_idx, kv_idx)
        return score

    def check_shape(self, B: int, Hq: int, Lq: int, Lkv: int) -> None:
        """Checks every composed mod that can be checked."""
        for mod in self.mods:
            check_mod_shape(mod, B, Hq, Lq, Lkv)


def compose(*score_mods: Callable) -> Composed:
    """The score mod applying `score_mods` left to right."""
    for m in score_mods:
        if not callable(m):
            raise TypeError(f"compose takes score mods, got {type(m).__name__}.")
    return Composed(tuple(score_mods))


def checkerboard(score, b, h, q_idx, kv_idx):
    """FlexAttention's example mod: scores halved where `|q_idx - kv_idx|` is odd."""
    d = jnp.abs(kv_idx - q_idx)
    score = score * 0.5
    return jnp.where(d % 2 == 0, score * 2.0, score)
