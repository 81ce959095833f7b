"""Equinox layers built on [`flex_attention`][eqx_flexattn.flex_attention].

!!! Example

    ```python
    import equinox as eqx
    import jax
    import eqx_flexattn as fa

    attn = fa.nn.MultiheadFlexAttention(
        num_heads=8,
        query_size=512,
        score_mod=fa.score_mods.generate_alibi_bias(8),  # learnable slopes
        key=jax.random.key(0),
    )
    x = jax.random.normal(jax.random.key(1), (1024, 512))
    y = attn(x, x, x, mask_mod=fa.masks.causal_mask)      # (1024, 512)
    ```
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from ._attention import flex_attention
from ._backends._config import expand_options, normalise_options
from ._block_mask import BlockMask, create_block_mask, DEFAULT_BLOCK_SIZE


__all__ = ["MultiheadFlexAttention", "apply_rotary"]


def _default_floating_dtype():
    return jnp.float64 if jax.config.read("jax_enable_x64") else jnp.float32


def apply_rotary(
    x: Float[Array, "seq heads dim"], theta: float | int = 10_000.0
) -> Float[Array, "seq heads dim"]:
    """Rotary position embedding (RoFormer) of `x`, position `i` at row `i`.

    Uses the "rotate half" convention of `equinox.nn.RotaryPositionalEmbedding` and
    Llama: channel `j < dim / 2` is paired with channel `j + dim / 2` and the pair is
    rotated by the angle `i * theta ** (-2 j / dim)`. Computed in at least float32,
    returned in the dtype of `x`.

    **Arguments:**

    - `x`: `(seq, heads, dim)` with `dim` even.
    - `theta`: the base of the rotation frequencies.

    **Returns:** an array like `x`.
    """
    seq, _, dim = x.shape
    if dim % 2:
        raise ValueError(
            f"Rotary embeddings need an even head dimension, got shape {x.shape}."
        )
    acc = jnp.promote_types(x.dtype, jnp.float32)
    inv_freq = 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=acc) / dim))
    angles = jnp.arange(seq, dtype=acc)[:, None] * inv_freq[None, :]
    cos = jnp.cos(angles)[:, None, :]
    sin = jnp.sin(angles)[:, None, :]
    x1, x2 = jnp.split(x.astype(acc), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


class MultiheadFlexAttention(eqx.Module):
    r"""Multi-head attention on [`flex_attention`][eqx_flexattn.flex_attention].

    The counterpart of `equinox.nn.MultiheadAttention` (same projections, same
    unbatched calling convention) that adds what FlexAttention offers: a score mod
    (ALiBi, relative-position biases, soft-capping... whose parameters are trained with
    the rest of the layer), block-sparse masks given as a
    [`BlockMask`][eqx_flexattn.BlockMask] or a mask mod, grouped-query attention and
    rotary position embeddings.

    Computes, for each query head $i$ reading key/value head $g(i)$,

    $$\text{out} = \sum_i \text{flex\_attention}(QW^Q_i, KW^K_{g(i)}, VW^V_{g(i)})
      W^O_i.$$

    Call it on one sequence; use `jax.vmap` (or `eqx.filter_vmap`) for a batch. Unlike
    `equinox.nn.MultiheadAttention` it has no boolean `mask=` (use `mask_mod=` or
    `block_mask=`), no dropout and no `process_heads`.

    !!! Example

        ```python
        import equinox as eqx
        import jax
        import eqx_flexattn as fa

        mha = fa.nn.MultiheadFlexAttention(
            num_heads=4,
            query_size=64,
            num_kv_heads=2,                                  # grouped-query attention
            score_mod=fa.score_mods.generate_alibi_bias(4),  # learnable ALiBi slopes
            key=jax.random.key(0),
        )
        x = jax.random.normal(jax.random.key(1), (8, 256, 64))   # a batch of 8

        @eqx.filter_jit
        def forward(mha, x):
            causal = lambda q, k, v: mha(q, k, v, mask_mod=fa.masks.causal_mask)
            return jax.vmap(causal)(x, x, x)

        y = forward(mha, x)                                      # (8, 256, 64)
        ```

    !!! tip

        Build a [`BlockMask`][eqx_flexattn.BlockMask] once with
        `create_block_mask(mask_mod, None, None, Lq, Lkv)` and pass it as `block_mask`
        to share it between layers and calls; `mask_mod=` rebuilds it at every call
        (cheap next to the attention, but not free). Per-example masks (document ids)
        work with `mask_mod=` under `jax.vmap`: the mask is built per example.
    """

    query_proj: eqx.nn.Linear
    key_proj: eqx.nn.Linear
    value_proj: eqx.nn.Linear
    output_proj: eqx.nn.Linear
    score_mod: Callable | None

    num_heads: int = eqx.field(static=True)
    num_kv_heads: int = eqx.field(static=True)
    query_size: int = eqx.field(static=True)
    key_size: int = eqx.field(static=True)
    value_size: int = eqx.field(static=True)
    output_size: int = eqx.field(static=True)
    qk_size: int = eqx.field(static=True)
    vo_size: int = eqx.field(static=True)
    use_query_bias: bool = eqx.field(static=True)
    use_key_bias: bool = eqx.field(static=True)
    use_value_bias: bool = eqx.field(static=True)
    use_output_bias: bool = eqx.field(static=True)
    rotary: bool = eqx.field(static=True)
    rope_theta: float = eqx.field(static=True)
    scale: float | None = eqx.field(static=True)
    block_size: int = eqx.field(static=True)
    backend: str = eqx.field(static=True)
    kernel_options: tuple[tuple[str, Any], ...] = eqx.field(static=True)

    def __init__(
        self,
        num_heads: int,
        query_size: int,
        key_size: int | None = None,
        value_size: int | None = None,
        output_size: int | None = None,
        qk_size: int | None = None,
        vo_size: int | None = None,
        num_kv_heads: int | None = None,
        use_query_bias: bool = False,
        use_key_bias: bool = False,
        use_value_bias: bool = False,
        use_output_bias: bool = False,
        score_mod: Callable | None = None,
        rotary: bool = False,
        rope_theta: float | int = 10_000.0,
        scale: float | int | None = None,
        block_size: int = DEFAULT_BLOCK_SIZE,
        backend: str = "auto",
        kernel_options: Mapping[str, Any] | None = None,
        dtype=None,
        *,
        key: PRNGKeyArray,
    ):
        r"""**Arguments:**

        - `num_heads`: number of query heads $h$.
        - `query_size`: channels of the query input.
        - `key_size`: channels of the key input. Defaults to `query_size`.
        - `value_size`: channels of the value input. Defaults to `query_size`.
        - `output_size`: channels of the output. Defaults to `query_size`.
        - `qk_size`: channels per head over which queries and keys are compared.
            Defaults to `query_size // num_heads`.
        - `vo_size`: channels per head of the values. Defaults to
            `query_size // num_heads`.
        - `num_kv_heads`: number of key/value heads, a divisor of `num_heads`
            (grouped-query attention; 1 is multi-query attention). Defaults to
            `num_heads`.
        - `use_query_bias`, `use_key_bias`, `use_value_bias`, `use_output_bias`:
            whether each projection has a bias.
        - `score_mod`: a score mod `score_mod(score, b, h, q_idx, kv_idx) -> score`
            applied to every head (`h` is the query head, `b` is always 0). An
            `eqx.Module` such as
            [`Alibi`][eqx_flexattn.score_mods.Alibi] or
            [`RelativePositionBias`][eqx_flexattn.score_mods.RelativePositionBias]
            is part of the layer: its floating-point arrays are trained with it.
        - `rotary`: apply rotary position embeddings (see
            [`apply_rotary`][eqx_flexattn.nn.apply_rotary]) to the query and key heads,
            position `i` being row `i` of each input. Needs an even `qk_size`.
        - `rope_theta`: the base of the rotary frequencies.
        - `scale`: multiplies `q k^T` before the score mod; defaults to
            `1 / sqrt(qk_size)`.
        - `block_size`: block size of the masks built from `mask_mod=` (capped at the
            sequence lengths).
        - `backend`: the [`flex_attention`][eqx_flexattn.flex_attention] backend.
        - `kernel_options`: backend tuning options.
        - `dtype`: dtype of the projection weights. Defaults to float32, or float64
            when JAX is in 64-bit mode.
        - `key`: a `jax.random.key` for the initialisation of the projections.
            (Keyword only argument.)
        """
        dtype = _default_floating_dtype() if dtype is None else dtype
        key_size = query_size if key_size is None else key_size
        value_size = query_size if value_size is None else value_size
        output_size = query_size if output_size is None else output_size
        qk_size = query_size // num_heads if qk_size is None else qk_size
        vo_size = query_size // num_heads if vo_size is None else vo_size
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        for name, value in (
            ("num_heads", num_heads),
            ("num_kv_heads", num_kv_heads),
            ("qk_size", qk_size),
            ("vo_size", vo_size),
            ("block_size", block_size),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
        if num_heads % num_kv_heads:
            raise ValueError(
                f"`num_heads`={num_heads} must be a multiple of "
                f"`num_kv_heads`={num_kv_heads}."
            )
        if rotary and qk_size % 2:
            raise ValueError(f"`rotary=True` needs an even `qk_size`, got {qk_size}.")
        if score_mod is not None and not callable(score_mod):
            raise TypeError(
                f"`score_mod` must be callable, got {type(score_mod).__name__}."
            )
        qkey, kkey, vkey, okey = jax.random.split(key, 4)
        self.query_proj = eqx.nn.Linear(
            query_size,
            num_heads * qk_size,
            use_bias=use_query_bias,
            dtype=dtype,
            key=qkey,
        )
        self.key_proj = eqx.nn.Linear(
            key_size,
            num_kv_heads * qk_size,
            use_bias=use_key_bias,
            dtype=dtype,
            key=kkey,
        )
        self.value_proj = eqx.nn.Linear(
            value_size,
            num_kv_heads * vo_size,
            use_bias=use_value_bias,
            dtype=dtype,
            key=vkey,
        )
        self.output_proj = eqx.nn.Linear(
            num_heads * vo_size,
            output_size,
            use_bias=use_output_bias,
            dtype=dtype,
            key=okey,
        )
        self.score_mod = score_mod
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.query_size = query_size
        self.key_size = key_size
        self.value_size = value_size
        self.output_size = output_size
        self.qk_size = qk_size
        self.vo_size = vo_size
        self.use_query_bias = use_query_bias
        self.use_key_bias = use_key_bias
        self.use_value_bias = use_value_bias
        self.use_output_bias = use_output_bias
        self.rotary = rotary
        self.rope_theta = float(rope_theta)
        self.scale = None if scale is None else float(scale)
        self.block_size = block_size
        self.backend = backend
        self.kernel_options = normalise_options(kernel_options)

    def __call__(
        self,
        query: Float[Array, "q_seq {self.query_size}"],
        key_: Float[Array, "kv_seq {self.key_size}"],
        value: Float[Array, "kv_seq {self.value_size}"],
        *,
        block_mask: BlockMask | None = None,
        mask_mod: Callable | None = None,
        key: PRNGKeyArray | None = None,
        mask: Any = None,
    ) -> Float[Array, "q_seq {self.output_size}"]:
        """**Arguments:**

        - `query`: `(q_seq, query_size)`.
        - `key_`: `(kv_seq, key_size)`.
        - `value`: `(kv_seq, value_size)`.
        - `block_mask`: a [`BlockMask`][eqx_flexattn.BlockMask] built for
            `(q_seq, kv_seq)` with batch size 1 (`B=None`) and 1 or `num_heads`
            heads. (Keyword only argument.)
        - `mask_mod`: alternatively, a mask mod `mask_mod(b, h, q_idx, kv_idx)`; the
            layer builds its block mask, shared by all heads (`B=H=None`), so the
            mask mod must not depend on `b` (always 0) or `h`: for a mask that
            differs between heads pass a `block_mask` built with `H=num_heads`.
            (Keyword only argument.)
        - `key`: ignored; for compatibility with the rest of the Equinox API.
            (Keyword only argument.)
        - `mask`: not taken: `eqx.nn.MultiheadAttention`'s dense `(q_seq, kv_seq)`
            bool mask is a `mask_mod` or a `block_mask` here; passing one raises a
            `TypeError` that says so.

        With neither `block_mask` nor `mask_mod`, every query attends to every key.

        **Returns:** an array of shape `(q_seq, output_size)`.
        """
        del key
        if mask is not None:
            raise TypeError(
                "MultiheadFlexAttention takes no dense `mask` (the `(q_seq, kv_seq)` "
                "bool array of `eqx.nn.MultiheadAttention`): pass `mask_mod=` (a "
                "function `mask_mod(b, h, q_idx, kv_idx) -> bool`, e.g. "
                "`fa.masks.causal_mask`; for an existing array `m`, `mask_mod=lambda "
                "b, h, q_idx, kv_idx: m[q_idx, kv_idx]`) or `block_mask=` (from "
                "`fa.create_block_mask`, shared between layers and calls)."
            )
        self._check_shapes(query, key_, value)
        if block_mask is not None and mask_mod is not None:
            raise ValueError("Pass `block_mask` or `mask_mod`, not both.")
        q_seq, kv_seq = query.shape[0], key_.shape[0]
        if mask_mod is not None:
            block_mask = create_block_mask(
                mask_mod,
                None,
                None,
                q_seq,
                kv_seq,
                block_size=(min(self.block_size, q_seq), min(self.block_size, kv_seq)),
            )
        q = self._project(self.query_proj, query, self.num_heads)
        k = self._project(self.key_proj, key_, self.num_kv_heads)
        v = self._project(self.value_proj, value, self.num_kv_heads)
        if self.rotary:
            q = apply_rotary(q, self.rope_theta)
            k = apply_rotary(k, self.rope_theta)
        # (seq, heads, size) -> (1, heads, seq, size)
        q, k, v = (jnp.swapaxes(x, 0, 1)[None] for x in (q, k, v))
        out = flex_attention(
            q,
            k,
            v,
            score_mod=self.score_mod,
            block_mask=block_mask,
            scale=self.scale,
            enable_gqa=self.num_kv_heads != self.num_heads,
            backend=self.backend,
            kernel_options=expand_options(self.kernel_options),
        )
        out = jnp.swapaxes(out[0], 0, 1).reshape(q_seq, self.num_heads * self.vo_size)
        return jax.vmap(self.output_proj)(out)

    def _project(self, proj: eqx.nn.Linear, x: Array, heads: int) -> Array:
        return jax.vmap(proj)(x).reshape(x.shape[0], heads, -1)

    def _check_shapes(self, query, key_, value) -> None:
        for name, x, size in (
            ("query", query, self.query_size),
            ("key_", key_, self.key_size),
            ("value", value, self.value_size),
        ):
            if x.ndim != 2 or x.shape[1] != size:
                raise ValueError(
                    f"`{name}` must have shape (seq, {size}), got {x.shape}. "
                    "MultiheadFlexAttention takes one sequence: use jax.vmap for a "
                    "batch."
                )
        if key_.shape[0] != value.shape[0]:
            raise ValueError(
                "`key_` and `value` must have the same length, got shapes "
                f"{key_.shape} and {value.shape}."
            )
