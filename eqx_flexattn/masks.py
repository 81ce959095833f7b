"""Ready-made mask mods: `mask_mod(b, h, q_idx, kv_idx) -> bool`.

Each is a function or an `eqx.Module`; modules hold their arrays (document ids) as
data, so new values never recompile a jitted function. Combine them with
[`and_masks`][eqx_flexattn.and_masks] and [`or_masks`][eqx_flexattn.or_masks].

!!! Example

    ```python
    from eqx_flexattn import and_masks, create_block_mask
    from eqx_flexattn.masks import causal_mask, document_mask

    ids = jnp.repeat(jnp.arange(4), 256)                 # 4 documents of 256 tokens
    mask = and_masks(causal_mask, document_mask(ids))
    bm = create_block_mask(mask, None, None, 1024, 1024)
    ```
"""

from __future__ import annotations

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Int

from ._block_mask import and_masks, noop_mask, or_masks
from ._mods import require_size


__all__ = [
    "causal_mask",
    "sliding_window",
    "prefix_lm",
    "document_mask",
    "chunked",
    "dilated_sliding_window",
    "neighborhood_2d",
    "noop_mask",
    "and_masks",
    "or_masks",
    "SlidingWindow",
    "PrefixLM",
    "DocumentMask",
    "Chunked",
    "DilatedSlidingWindow",
    "Neighborhood2D",
]


def causal_mask(b, h, q_idx, kv_idx):
    """Each query sees itself and every earlier position: `q_idx >= kv_idx`."""
    del b, h
    return q_idx >= kv_idx


def _positive(name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
    return value


class SlidingWindow(eqx.Module):
    """Causal sliding window: `0 <= q_idx - kv_idx <= window`."""

    window: int = eqx.field(static=True)

    def __call__(self, b, h, q_idx, kv_idx):
        d = q_idx - kv_idx
        return (d >= 0) & (d <= self.window)


def sliding_window(window: int) -> SlidingWindow:
    """Causal sliding window: each query sees itself and the `window` positions before.

    The same as attention-gym's `and_masks(causal, q_idx - kv_idx <= window)` and
    `jax.nn.dot_product_attention(local_window_size=(window, 0), is_causal=True)`.
    """
    return SlidingWindow(_positive("window", window))


class PrefixLM(eqx.Module):
    """Bidirectional over the first `prefix_length` keys, causal after them."""

    prefix_length: int = eqx.field(static=True)

    def __call__(self, b, h, q_idx, kv_idx):
        return (kv_idx < self.prefix_length) | (q_idx >= kv_idx)


def prefix_lm(prefix_length: int) -> PrefixLM:
    """Prefix-LM: every query sees the first `prefix_length` positions, the rest
    causally."""
    return PrefixLM(_positive("prefix_length", prefix_length))


class DocumentMask(eqx.Module):
    """Attend only within one document (sequence packing).

    `q_document_ids`/`kv_document_ids` are int arrays of shape `(L,)` (shared by the
    batch) or `(B, L)`; they are data, so changing them never recompiles.
    """

    q_document_ids: Int[Array, "*batch lq"]
    kv_document_ids: Int[Array, "*batch lkv"]

    def __call__(self, b, h, q_idx, kv_idx):
        return _ids_at(self.q_document_ids, b, q_idx) == _ids_at(
            self.kv_document_ids, b, kv_idx
        )

    def check_shape(self, B: int, Hq: int, Lq: int, Lkv: int) -> None:
        """Ids cover every position; batched `(B, L)` ids match the batch size B of
        the mask (a mask built with `B=None` broadcasts one batch element's blocks to
        all: give `(L,)` ids, or pass B)."""
        for field, length, name in (
            ("q_document_ids", Lq, "Lq"),
            ("kv_document_ids", Lkv, "Lkv"),
        ):
            ids = getattr(self, field)
            require_size(self, field, ids.ndim - 1, ids.shape[-1], name, length)
            if ids.ndim == 2:
                require_size(self, field, 0, ids.shape[0], "B", B, exact=True)


def _ids_at(ids, b, idx):
    return ids[idx] if ids.ndim == 1 else ids[b, idx]


def document_mask(
    document_ids: Int[Array, "*batch lq"],
    kv_document_ids: Int[Array, "*batch lkv"] | None = None,
) -> DocumentMask:
    """Mask keeping pairs of positions in the same document.

    **Arguments:**

    - `document_ids`: int array `(L,)` or `(B, L)`: the document of each query
        position (and of each key position, unless `kv_document_ids` is given).
    - `kv_document_ids`: the documents of the key positions, when they differ.

    Combine with `causal_mask` for packed causal language modelling:
    `and_masks(causal_mask, document_mask(ids))`.
    """
    q_ids = jnp.asarray(document_ids)
    kv_ids = q_ids if kv_document_ids is None else jnp.asarray(kv_document_ids)
    for name, ids in (("document_ids", q_ids), ("kv_document_ids", kv_ids)):
        if ids.ndim not in (1, 2) or not jnp.issubdtype(ids.dtype, jnp.integer):
            raise TypeError(
                f"`{name}` must be an int array of shape (L,) or (B, L), got "
                f"{ids.dtype} {ids.shape}."
            )
    return DocumentMask(q_ids, kv_ids)


class Chunked(eqx.Module):
    """Attend within fixed-size chunks: `q_idx // size == kv_idx // size`."""

    chunk_size: int = eqx.field(static=True)

    def __call__(self, b, h, q_idx, kv_idx):
        return q_idx // self.chunk_size == kv_idx // self.chunk_size


def chunked(chunk_size: int) -> Chunked:
    """Chunked (local block) attention, as in Llama 4; add `causal_mask` for causal."""
    return Chunked(_positive("chunk_size", chunk_size))


class DilatedSlidingWindow(eqx.Module):
    """Causal window of `window` earlier positions taken every `dilation` positions."""

    window: int = eqx.field(static=True)
    dilation: int = eqx.field(static=True)

    def __call__(self, b, h, q_idx, kv_idx):
        d = q_idx - kv_idx
        return (d >= 0) & (d <= self.window * self.dilation) & (d % self.dilation == 0)


def dilated_sliding_window(window: int, dilation: int) -> DilatedSlidingWindow:
    """Each query sees itself and `window` earlier positions spaced `dilation` apart."""
    return DilatedSlidingWindow(
        _positive("window", window), _positive("dilation", dilation)
    )


class Neighborhood2D(eqx.Module):
    """2-D neighbourhood attention on a row-major `height x width` grid of tokens."""

    width: int = eqx.field(static=True)
    radius: int = eqx.field(static=True)

    def __call__(self, b, h, q_idx, kv_idx):
        dy = q_idx // self.width - kv_idx // self.width
        dx = q_idx % self.width - kv_idx % self.width
        return (jnp.abs(dy) <= self.radius) & (jnp.abs(dx) <= self.radius)


def neighborhood_2d(width: int, radius: int) -> Neighborhood2D:
    """Tokens of an image flattened row by row (`width` per row) see the tokens at
    most `radius` rows and columns away (NATTEN-style neighbourhood attention)."""
    return Neighborhood2D(_positive("width", width), _positive("radius", radius))
