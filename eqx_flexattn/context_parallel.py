"""Attention over several devices: batch and head sharding, and context parallelism
over the sequence (ring attention, or an all-gather of K/V), on `jax.sharding` and
`shard_map`.

```python
from eqx_flexattn import context_parallel as cp

mesh = jax.make_mesh((8,), ("seq",), axis_types=(jax.sharding.AxisType.Auto,))
out = cp.flex_attention(q, k, v, score_mod, block_mask, mesh=mesh, axis_name="seq")
```
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import numpy as np
from jax.sharding import AbstractMesh, Mesh
from jaxtyping import Array, Float

from ._block_mask import BlockMask
from ._context_parallel import (
    choose_strategy as choose_strategy,
    chunk_order,
    padded_length,
    permute_chunks,
    sharded_attention,
)
from ._merge import merge_attention as merge_attention


def flex_attention(
    query: Float[Array, "b hq lq d"],
    key: Float[Array, "b hkv lkv d"],
    value: Float[Array, "b hkv lkv dv"],
    score_mod: Callable | None = None,
    block_mask: BlockMask | None = None,
    *,
    mesh: Mesh | AbstractMesh,
    axis_name: str | None = None,
    batch_axis: str | None = None,
    head_axis: str | None = None,
    strategy: str = "auto",
    layout: str = "natural",
    scale: float | int | Array | None = None,
    enable_gqa: bool = False,
    return_lse: bool = False,
    backend: str = "auto",
    kernel_options: dict[str, Any] | None = None,
) -> (
    Float[Array, "b hq lq dv"]
    | tuple[Float[Array, "b hq lq dv"], Float[Array, "b hq lq"]]
):
    """[`eqx_flexattn.flex_attention`][] sharded over the devices of `mesh`.

    Each device runs the chosen backend on its own shard (inside `jax.shard_map`):
    batch over `batch_axis`, heads over `head_axis` (no K/V moves between devices),
    and the sequence over `axis_name` (context parallelism: K/V chunks move). Score
    mods, mask mods and block masks are those of the single-device call, written for
    global positions; their arrays are replicated, and the gradients of a score mod's
    parameters are summed over devices (a `psum` of per-device partials). Results
    equal the single-device call's.

    **Arguments:** as [`eqx_flexattn.flex_attention`][], and

    - `mesh`: a `jax.sharding.Mesh` (`Auto` or `Explicit` axes), or an
        `AbstractMesh` (to lower for other devices).
    - `axis_name`: the mesh axis the sequence is split over, or `None`.
    - `batch_axis`, `head_axis`: mesh axes for the batch and the heads (query and
        key/value heads: `Hkv` must divide too), or `None`.
    - `strategy`: with `axis_name`: `"ring"` passes K/V chunks around the ring with
        `ppermute`, one step per device, the transfer of the next chunk overlapped
        with the blocks of this one, and skips chunks whose blocks the block mask
        leaves empty for every local query (sliding windows and documents cost
        their band); the backward pass runs the ring again carrying dK/dV, and
        memory per device stays O(L / P). `"all_gather"` gathers K/V once (memory
        O(L) per device; its backward is a reduce-scatter). `"auto"` takes
        [`choose_strategy`][]: all-gather for rings of at most 2 devices or when
        `P <= Hq // Hkv` (GQA with few K/V heads), else the ring.
    - `layout`: `"natural"`: the sequence in order; device `i` holds chunk `i` (the
        length need not divide: it is padded inside). `"balanced"`: the inputs are in
        the load-balanced order of [`to_balanced`][] (device `i` holds chunk `i` and
        chunk `2P - 1 - i` of `2P`, so causal work is equal on every device, as in
        Llama 3's context parallelism); the outputs are too (undo with
        [`from_balanced`][]); `block_mask` is required and stays in natural order.

    **Returns:** as `flex_attention`, sharded like `query` (in the balanced order
    with `layout="balanced"`).

    Call it inside `jax.jit`. With `axis_name`, Lq must equal Lkv (self-attention),
    and the block mask's block size must divide the chunk (`to_balanced(...,
    block_size=)` pads so; the natural layout pads inside).

    !!! Example

        ```python
        mesh = jax.make_mesh((2, 4), ("data", "seq"),
                             axis_types=(jax.sharding.AxisType.Auto,) * 2)
        bm = fa.create_block_mask(fa.masks.causal_mask, None, None, L, L)
        out = jax.jit(lambda q, k, v: cp.flex_attention(
            q, k, v, block_mask=bm, mesh=mesh, axis_name="seq", batch_axis="data"
        ))(q, k, v)
        ```
    """
    return sharded_attention(
        query,
        key,
        value,
        score_mod,
        block_mask,
        mesh=mesh,
        axis_name=axis_name,
        batch_axis=batch_axis,
        head_axis=head_axis,
        scale=scale,
        enable_gqa=enable_gqa,
        return_lse=return_lse,
        backend=backend,
        kernel_options=kernel_options,
        strategy=strategy,
        layout=layout,
    )


def _check_devices(num_devices: Any) -> int:
    if not isinstance(num_devices, int | np.integer) or num_devices < 1:
        raise ValueError(f"`num_devices` must be a positive int, got {num_devices!r}.")
    return int(num_devices)


def to_balanced(
    x: Array, num_devices: int, *, axis: int = 2, block_size: int = 128
) -> Array:
    """Puts a sequence into the load-balanced order of `layout="balanced"`.

    Pads `axis` with zeros to `2 * num_devices` chunks of a multiple of `block_size`
    (the block mask's block size), then orders the chunks `0, 2P-1, 1, 2P-2, ...`:
    sharded over `num_devices` devices, device `i` holds chunks `i` and `2P - 1 - i`.

    !!! Example

        ```python
        qb, kb, vb = (cp.to_balanced(x, 8) for x in (q, k, v))
        out = cp.from_balanced(cp.flex_attention(qb, kb, vb, None, bm, mesh=mesh,
                               axis_name="seq", layout="balanced"), 8, L)
        ```
    """
    p = _check_devices(num_devices)
    axis = axis % x.ndim
    length = x.shape[axis]
    padded = padded_length(length, 2 * p, block_size)
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, padded - length)
    return permute_chunks(jnp.pad(x, pad), chunk_order(p, "balanced"), axis)


def from_balanced(x: Array, num_devices: int, length: int, *, axis: int = 2) -> Array:
    """Undoes [`to_balanced`][]: the natural order, cropped to `length`."""
    p = _check_devices(num_devices)
    axis = axis % x.ndim
    if x.shape[axis] % (2 * p) or x.shape[axis] < length:
        raise ValueError(
            f"from_balanced: axis {axis} has size {x.shape[axis]}, not {2 * p} equal "
            f"chunks covering length {length}."
        )
    inverse = np.argsort(chunk_order(p, "balanced"))
    x = permute_chunks(x, inverse, axis)
    return x.take(np.arange(length), axis=axis) if length < x.shape[axis] else x
