"""`BlockMask`: the block-sparse description of which (query, key) tiles to compute."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Int

from ._mods import (
    check_mod_shape,
    closes_over_arrays,
    convert_mask_mod,
    INDEX_DTYPE,
    index_grid,
    ScalarMod,
)


# Elements of the mask evaluated at once by `create_block_mask`: 2**24 bools is
# 16 MiB, so building a mask never needs more than a few hundred MiB at any length.
_MASK_CHUNK_ELEMENTS = 2**24

# The block size of masks built without one, and of the attend-everywhere mask.
DEFAULT_BLOCK_SIZE = 128

# The eight index arrays of a `BlockMask`, in constructor order: the forward (kv)
# lists, partial then full, then their transposes (q lists) for the backward pass.
_INDEX_FIELDS = (
    "kv_num_blocks",
    "kv_indices",
    "full_kv_num_blocks",
    "full_kv_indices",
    "q_num_blocks",
    "q_indices",
    "full_q_num_blocks",
    "full_q_indices",
)


def noop_mask(b, h, q_idx, kv_idx):
    """The mask mod that keeps every position."""
    del b, h, q_idx, kv_idx
    return jnp.asarray(True)


class _CombinedMask(eqx.Module):
    mods: tuple[Callable, ...]
    op: str = eqx.field(static=True)
    name: str | None = eqx.field(static=True, default=None)

    @property
    def __name__(self) -> str:
        return repr(self)

    def __setattr__(self, name, value):
        if name != "__name__":
            return super().__setattr__(name, value)
        # attention-gym names its combined masks (`mask.__name__ = "..."`): kept in a
        # static field, set right after construction, so it survives flattening.
        object.__setattr__(self, "name", str(value))

    def __call__(self, b, h, q_idx, kv_idx):
        out = jnp.asarray(self.op == "and")
        for mod in self.mods:
            m = mod(b, h, q_idx, kv_idx)
            out = (out & m) if self.op == "and" else (out | m)
        return out

    def __repr__(self):
        if self.name is not None:
            return self.name
        return f"{self.op}_masks({', '.join(map(_mod_name, self.mods))})"

    def check_shape(self, B: int, Hq: int, Lq: int, Lkv: int) -> None:
        """Checks every combined mask mod that can be checked."""
        for mod in self.mods:
            check_mod_shape(mod, B, Hq, Lq, Lkv)


def and_masks(*mask_mods: Callable) -> Callable:
    """Mask mod that keeps a position when every one of `mask_mods` keeps it.

    !!! Example

        ```python
        mask = and_masks(causal_mask, sliding_window(256))
        ```
    """
    _check_callables(mask_mods, "and_masks")
    return _CombinedMask(tuple(mask_mods), "and")


def or_masks(*mask_mods: Callable) -> Callable:
    """Mask mod that keeps a position when any one of `mask_mods` keeps it.

    !!! Example

        ```python
        mask = or_masks(prefix_lm(64), causal_mask)
        ```
    """
    _check_callables(mask_mods, "or_masks")
    return _CombinedMask(tuple(mask_mods), "or")


def _check_callables(mods, name):
    for m in mods:
        if not callable(m):
            raise TypeError(f"{name} takes mask mods, got {type(m).__name__}.")


def _mod_name(mod) -> str:
    if isinstance(mod, _CombinedMask):
        return repr(mod)
    if isinstance(mod, ScalarMod):
        return mod.name
    if isinstance(mod, eqx.Module):
        return type(mod).__name__
    return getattr(mod, "__name__", type(mod).__name__)


def _pair(x: int | tuple[int, int], name: str) -> tuple[int, int]:
    if isinstance(x, int | np.integer):
        x = (int(x), int(x))
    if (
        not isinstance(x, tuple | list)
        or len(x) != 2
        or not all(isinstance(v, int | np.integer) for v in x)
    ):
        raise TypeError(f"`{name}` must be an int or a pair of ints, got {x!r}.")
    x = (int(x[0]), int(x[1]))
    if min(x) <= 0:
        raise ValueError(f"`{name}` must be positive, got {x}.")
    return x


def _block_size_arg(block_size: Any, BLOCK_SIZE: Any) -> tuple[int, int]:
    """`block_size`, or PyTorch's spelling `BLOCK_SIZE`; 128 when neither is given."""
    if block_size is not None and BLOCK_SIZE is not None:
        raise TypeError(
            "Pass `block_size` or PyTorch's spelling `BLOCK_SIZE`, not both."
        )
    given = BLOCK_SIZE if block_size is None else block_size
    name = (
        "BLOCK_SIZE"
        if block_size is None and BLOCK_SIZE is not None
        else ("block_size")
    )
    return _pair(DEFAULT_BLOCK_SIZE if given is None else given, name)


_noted_device = False


def _note_device(device: Any) -> None:
    """PyTorch's `device=` argument: ignored, with a note once per process."""
    global _noted_device
    if device is None or _noted_device:
        return
    _noted_device = True
    warnings.warn(
        f"eqx_flexattn ignores `device={device!r}` (a PyTorch argument): JAX places "
        "arrays on the default device. Use `jax.device_put` or "
        "`with jax.default_device(...)` to choose one. (Noted once per process.)",
        UserWarning,
        stacklevel=3,
    )


def _check_length(name: str, n: Any) -> int:
    if not isinstance(n, int | np.integer) or n <= 0:
        raise ValueError(f"`{name}` must be a positive int, got {n!r}.")
    return int(n)


def _check_batch(name: str, n: Any) -> int:
    if n is None:
        return 1
    return _check_length(name, n)


def _dense_to_indices(dense: Bool[Array, "*batch n"]) -> tuple[Array, Array]:
    """(num, indices): the True positions of the last axis first, ascending."""
    num = jnp.sum(dense, axis=-1, dtype=INDEX_DTYPE)
    indices = jnp.argsort(~dense, axis=-1, stable=True).astype(INDEX_DTYPE)
    return num, indices


def _indices_to_dense(
    num: Array, indices: Array, n: int, check: bool = True
) -> Bool[Array, ...]:
    """Inverse of `_dense_to_indices`: a bool array whose last axis has size `n`.
    With `check`, a listed index outside `[0, n)` is an error (`eqx.error_if`, a
    runtime check); without, it is dropped."""
    *batch, m = indices.shape
    valid = jnp.arange(m) < num[..., None]
    if check:
        indices = eqx.error_if(
            indices,
            valid & ((indices < 0) | (indices >= n)),
            f"BlockMask: a listed block index is outside [0, {n}).",
        )

    def row(idx, ok):
        return jnp.zeros((n,), bool).at[idx].max(ok, mode="drop")

    flat = jax.vmap(row)(indices.reshape(-1, m), valid.reshape(-1, m))
    return flat.reshape(*batch, n)


class BlockMask(eqx.Module):
    """Block-sparse attention mask: which (query block, key block) tiles to compute.

    Build one with [`create_block_mask`][eqx_flexattn.create_block_mask] (or
    [`BlockMask.from_kv_blocks`][]). A tile is *partial* (the mask mod is evaluated on
    each element), *full* (every element attends, the mask mod is skipped) or absent
    (not computed). Query block `i` of batch `b`, head `h` computes the key blocks
    `kv_indices[b, h, i, :kv_num_blocks[b, h, i]]` (partial) and
    `full_kv_indices[b, h, i, :full_kv_num_blocks[b, h, i]]` (full); the `q_*` arrays
    hold the same information transposed, for the backward pass. A batch or head
    dimension of size 1 broadcasts.

    A `BlockMask` is a PyTree whose leaves are its index arrays and the arrays of its
    mask mod: it passes through `jax.jit`, `jax.vmap` and `lax.scan` as data (new
    document ids never recompile). Block sizes, sequence lengths and the mask mod's
    code are static.

    **Fields:** `kv_num_blocks (B, H, Mq)`, `kv_indices (B, H, Mq, Nkv)`,
    `full_kv_num_blocks (B, H, Mq)`, `full_kv_indices (B, H, Mq, Nkv)`,
    `q_num_blocks (B, H, Nkv)`, `q_indices (B, H, Nkv, Mq)`,
    `full_q_num_blocks (B, H, Nkv)`, `full_q_indices (B, H, Nkv, Mq)`, all int32;
    `block_size = (block_q, block_kv)` and `seq_lengths = (Lq, Lkv)`, static ints;
    `mask_mod` (a property).

    The constructor takes the eight arrays as they are: each list must hold distinct
    blocks, a block may not be both partial and full, and the `q_*` lists must be the
    transposes of the `kv_*` lists. `create_block_mask` and `from_kv_blocks` build
    masks that satisfy this; prefer them.
    """

    kv_num_blocks: Int[Array, "b h mq"]
    kv_indices: Int[Array, "b h mq nkv"]
    full_kv_num_blocks: Int[Array, "b h mq"]
    full_kv_indices: Int[Array, "b h mq nkv"]
    q_num_blocks: Int[Array, "b h nkv"]
    q_indices: Int[Array, "b h nkv mq"]
    full_q_num_blocks: Int[Array, "b h nkv"]
    full_q_indices: Int[Array, "b h nkv mq"]
    block_size: tuple[int, int] = eqx.field(static=True)
    seq_lengths: tuple[int, int] = eqx.field(static=True)
    mask_arrays: Any
    mask_static: Any = eqx.field(static=True)

    def __init__(
        self,
        kv_num_blocks,
        kv_indices,
        full_kv_num_blocks,
        full_kv_indices,
        q_num_blocks,
        q_indices,
        full_q_num_blocks,
        full_q_indices,
        *,
        block_size: int | tuple[int, int],
        seq_lengths: tuple[int, int],
        mask_mod: Callable | None = None,
    ):
        block_size = _pair(block_size, "block_size")
        seq_lengths = _pair(seq_lengths, "seq_lengths")
        mq = math.ceil(seq_lengths[0] / block_size[0])
        nkv = math.ceil(seq_lengths[1] / block_size[1])
        arrays = (
            kv_num_blocks,
            kv_indices,
            full_kv_num_blocks,
            full_kv_indices,
            q_num_blocks,
            q_indices,
            full_q_num_blocks,
            full_q_indices,
        )
        b, h = jnp.shape(kv_num_blocks)[:2]
        kv_shapes = ((b, h, mq), (b, h, mq, nkv))
        q_shapes = ((b, h, nkv), (b, h, nkv, mq))
        expected = 2 * kv_shapes + 2 * q_shapes
        for name, x, shape in zip(_INDEX_FIELDS, arrays, expected):
            x = jnp.asarray(x)
            if x.shape != shape:
                raise ValueError(
                    f"BlockMask: `{name}` has shape {x.shape}, expected "
                    f"{shape} for seq_lengths={seq_lengths} and "
                    f"block_size={block_size}."
                )
            if not jnp.issubdtype(x.dtype, jnp.integer):
                raise TypeError(
                    f"BlockMask: `{name}` must hold integers, got dtype {x.dtype}."
                )
            setattr(self, name, x.astype(INDEX_DTYPE))
        self.block_size = block_size
        self.seq_lengths = seq_lengths
        mask_mod = noop_mask if mask_mod is None else mask_mod
        if closes_over_arrays(mask_mod):
            # Hoist captured arrays into leaves, so they cross `jit` as data.
            mask_mod = convert_mask_mod(mask_mod)
        self.mask_arrays, self.mask_static = eqx.partition(mask_mod, eqx.is_array)

    @property
    def mask_mod(self) -> Callable:
        """The mask mod applied to the elements of partial blocks."""
        return eqx.combine(self.mask_arrays, self.mask_static)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """`(B, H, Lq, Lkv)`; B or H of 1 broadcasts."""
        b, h = self.kv_num_blocks.shape[:2]
        return (b, h, *self.seq_lengths)

    @property
    def BLOCK_SIZE(self) -> tuple[int, int]:
        """PyTorch's name for `block_size`: `(block_q, block_kv)`."""
        return self.block_size

    def numel(self) -> int:
        """The number of elements of the mask, `B * H * Lq * Lkv` (as PyTorch's
        `BlockMask.numel`, not accounting for sparsity)."""
        return math.prod(self.shape)

    def as_tuple(self, flatten: bool = True) -> tuple:
        """PyTorch's `BlockMask.as_tuple`: `(Lq, Lkv, kv_num_blocks, kv_indices,
        full_kv_num_blocks, full_kv_indices, q_num_blocks, q_indices,
        full_q_num_blocks, full_q_indices, block_q, block_kv, mask_mod)`; with
        `flatten=False` the lengths and block sizes stay pairs."""
        lengths = self.seq_lengths if flatten else (self.seq_lengths,)
        sizes = self.block_size if flatten else (self.block_size,)
        arrays = tuple(getattr(self, n) for n in _INDEX_FIELDS)
        return (*lengths, *arrays, *sizes, self.mask_mod)

    def _adjust(self, new_q_len: int, new_kv_len: int) -> BlockMask:
        """PyTorch's name for [`adjust`][eqx_flexattn.BlockMask.adjust]."""
        return self.adjust(new_q_len, new_kv_len)

    @property
    def num_blocks(self) -> tuple[int, int]:
        """`(Mq, Nkv)`: the number of query and key blocks."""
        return self.kv_indices.shape[-2], self.kv_indices.shape[-1]

    @classmethod
    def from_kv_blocks(
        cls,
        kv_num_blocks: Int[Array, "b h mq"],
        kv_indices: Int[Array, "b h mq nkv"],
        full_kv_num_blocks: Int[Array, "b h mq"] | None = None,
        full_kv_indices: Int[Array, "b h mq nkv"] | None = None,
        *,
        block_size: int | tuple[int, int] | None = None,
        mask_mod: Callable | None = None,
        seq_lengths: tuple[int, int] | None = None,
        BLOCK_SIZE: int | tuple[int, int] | None = None,
        compute_q_blocks: bool = True,
    ) -> BlockMask:
        """Builds a `BlockMask` from its forward (kv) block lists alone.

        The lists may be in any order and repeat blocks; a block listed as full and
        partial is full. The transposed `q_*` lists are derived. `seq_lengths`
        defaults to the number of blocks times the block size. Entries past
        `kv_num_blocks` are ignored; listed indices outside `[0, Nkv)` are an error
        (checked when the arrays are computed, with `eqx.error_if`). `block_size`
        defaults to 128.

        PyTorch's spellings are accepted: `BLOCK_SIZE` for `block_size`, and
        `compute_q_blocks` (the `q_*` lists are always computed: every backend's
        backward pass reads them).
        """
        del compute_q_blocks
        block_size = _block_size_arg(block_size, BLOCK_SIZE)
        kv_num_blocks = jnp.asarray(kv_num_blocks)
        kv_indices = jnp.asarray(kv_indices)
        if kv_num_blocks.ndim != 3 or kv_indices.ndim != 4:
            raise ValueError(
                "from_kv_blocks: `kv_num_blocks` must be (B, H, Mq) and `kv_indices` "
                f"(B, H, Mq, Nkv), got {kv_num_blocks.shape} and {kv_indices.shape}."
            )
        mq, nkv = kv_indices.shape[-2:]
        if seq_lengths is None:
            seq_lengths = (mq * block_size[0], nkv * block_size[1])
        if (full_kv_num_blocks is None) != (full_kv_indices is None):
            raise ValueError(
                "from_kv_blocks: pass both `full_kv_num_blocks` and `full_kv_indices`, "
                "or neither."
            )
        if full_kv_num_blocks is None:
            full_kv_num_blocks = jnp.zeros_like(kv_num_blocks)
            full_kv_indices = jnp.zeros_like(kv_indices)
        partial = _indices_to_dense(kv_num_blocks, kv_indices, nkv)
        full = _indices_to_dense(
            jnp.asarray(full_kv_num_blocks), jnp.asarray(full_kv_indices), nkv
        )
        return cls._from_dense(partial & ~full, full, block_size, seq_lengths, mask_mod)

    @classmethod
    def _from_dense(cls, partial, full, block_size, seq_lengths, mask_mod):
        kv = _dense_to_indices(partial) + _dense_to_indices(full)
        t = lambda x: jnp.swapaxes(x, -1, -2)
        q = _dense_to_indices(t(partial)) + _dense_to_indices(t(full))
        return cls(
            *kv, *q, block_size=block_size, seq_lengths=seq_lengths, mask_mod=mask_mod
        )

    def block_lists(
        self, transposed: bool = False
    ) -> tuple[
        tuple[Int[Array, "*bh m"], Int[Array, "*bh m n"]],
        tuple[Int[Array, "*bh m"], Int[Array, "*bh m n"]],
    ]:
        """The block lists as `((partial_num, partial_indices), (full_num,
        full_indices))`.

        Forward (`transposed=False`): the key blocks of each query block,
        `kv_num_blocks (B, H, Mq)` and `kv_indices (B, H, Mq, Nkv)`, then their `full_`
        counterparts. Transposed: the query blocks of each key block, `q_num_blocks
        (B, H, Nkv)` and `q_indices (B, H, Nkv, Mq)`, then `full_q_*`. Entry `i` of a
        row is valid for `i < num`.

        !!! Example

            ```python
            (num, idx), (full_num, full_idx) = bm.block_lists()
            kv_blocks_of_row = idx[b, h, i, : num[b, h, i]]   # partial blocks
            ```
        """
        if transposed:
            return (
                (self.q_num_blocks, self.q_indices),
                (self.full_q_num_blocks, self.full_q_indices),
            )
        return (
            (self.kv_num_blocks, self.kv_indices),
            (self.full_kv_num_blocks, self.full_kv_indices),
        )

    def block_states(
        self,
    ) -> tuple[Bool[Array, "*bh mq nkv"], Bool[Array, "*bh mq nkv"]]:
        """`(partial, full)`: bool arrays `(B, H, Mq, Nkv)`, True where block
        `(i, j)` is partial (mask mod applied) or full (mask mod skipped). A block is
        never both; a block that is neither is absent.

        !!! Example

            ```python
            partial, full = bm.block_states()
            computed = partial | full   # == bm.to_dense().astype(bool)
            ```
        """
        return self._states(check=True)

    def _states(self, check: bool):
        nkv = self.num_blocks[1]
        (num, idx), (full_num, full_idx) = self.block_lists()
        partial = _indices_to_dense(num, idx, nkv, check)
        full = _indices_to_dense(full_num, full_idx, nkv, check)
        return partial, full

    def to_dense(self) -> Int[Array, "*bh mq nkv"]:
        """The block-level mask `(B, H, Mq, Nkv)`: 1 where a block is computed."""
        partial, full = self.block_states()
        return (partial | full).astype(INDEX_DTYPE)

    def sparsity(self) -> float | Array:
        """Percentage of blocks that are skipped: a float, or a scalar array when
        traced. (PyTorch weighs blocks by their area inside the sequence lengths;
        the two agree when the lengths are multiples of the block size.)"""
        dense = self.to_dense()
        if isinstance(dense, jax.core.Tracer):
            return 100.0 * (dense.size - jnp.sum(dense)) / dense.size
        # Exact: the correctly rounded ratio of two integers (`40.0`, not the
        # `40.000003814697266` of a float32 mean).
        return 100 * (dense.size - int(np.sum(np.asarray(dense)))) / dense.size

    def __getitem__(self, index) -> BlockMask:
        """Selects batches and heads: `bm[b]`, `bm[b, h]`, `bm[:, h0:h1]`.

        Integer indices keep their dimension (of size 1), so the result is again a
        valid, broadcastable `BlockMask`.
        """
        if not isinstance(index, tuple):
            index = (index,)
        if len(index) > 2:
            raise IndexError(
                "A BlockMask can be indexed on its batch and head dimensions only, "
                f"got {len(index)} indices."
            )
        sizes = self.kv_num_blocks.shape[:2]
        index = tuple(
            _keepdim(i, n, name) for i, n, name in zip(index, sizes, ("batch", "head"))
        )
        return BlockMask(
            *(getattr(self, n)[index] for n in _INDEX_FIELDS),
            block_size=self.block_size,
            seq_lengths=self.seq_lengths,
            mask_mod=self.mask_mod,
        )

    def adjust(self, q_len: int, kv_len: int) -> BlockMask:
        """This mask cropped to shorter sequence lengths (e.g. for a shorter batch).

        The mask mod keeps its meaning: element `(q, kv)` of the result is element
        `(q, kv)` of this mask. Growing is impossible without re-evaluating the mask
        mod: call `create_block_mask` again for that.
        """
        q_len = _check_length("q_len", q_len)
        kv_len = _check_length("kv_len", kv_len)
        if q_len > self.seq_lengths[0] or kv_len > self.seq_lengths[1]:
            raise ValueError(
                f"adjust can only shrink a BlockMask: it was built for "
                f"seq_lengths={self.seq_lengths}, got ({q_len}, {kv_len}). Build a "
                "new one with create_block_mask."
            )
        mq = math.ceil(q_len / self.block_size[0])
        nkv = math.ceil(kv_len / self.block_size[1])
        partial, full = self.block_states()
        return BlockMask._from_dense(
            partial[..., :mq, :nkv],
            full[..., :mq, :nkv],
            self.block_size,
            (q_len, kv_len),
            self.mask_mod,
        )

    def at_block_size(self, block_q: int, block_kv: int) -> BlockMask:
        """This mask at another tile size, computing the same attention.

        On each axis one size must be a multiple of the other. Where the new size is
        larger (coarsening), a block is full when every one of its sub-blocks inside
        the sequence is full, absent when all are absent, and partial otherwise:
        exactly what `create_block_mask` builds at the new size. Where it is smaller
        (refining), each block takes its parent's state; blocks past the sequence end
        are dropped. A refined mask equals `create_block_mask` at the new size where
        each parent block's elements all attend or none do; elsewhere it lists as
        partial some blocks that would be full or absent, which costs time but gives
        the same attention. The mask mod is never evaluated; the mask mod and the
        sequence lengths are kept. Jittable (the sizes are static).

        **Arguments:**

        - `block_q`, `block_kv`: the new block sizes, e.g. the tile sizes of a kernel.

        **Returns:** a `BlockMask` with `block_size=(block_q, block_kv)`, or this mask
        when its block size is that already.

        **Raises:** `ValueError` when on some axis neither size divides the other.

        !!! Example

            ```python
            bm = create_block_mask(causal_mask, None, None, 4096, 4096)   # 128 x 128
            bm_tiles = bm.at_block_size(64, 128)
            ```
        """
        new_size = _pair((block_q, block_kv), "(block_q, block_kv)")
        if new_size == self.block_size:
            return self
        for old, new in zip(self.block_size, new_size):
            if new % old and old % new:
                raise ValueError(
                    f"at_block_size: cannot convert a BlockMask of block_size="
                    f"{self.block_size} to block_size={new_size}: on each axis one "
                    f"size must be a multiple of the other, and {old} and {new} are "
                    "not."
                )
        # No index check: kernels convert inside the compiled call, where a check
        # would cost a host callback; out-of-range entries are dropped.
        partial, full = self._states(check=False)
        for axis, old, new, length in zip(
            (-2, -1), self.block_size, new_size, self.seq_lengths
        ):
            partial, full = _resize_axis(partial, full, axis, old, new, length)
        return BlockMask._from_dense(
            partial, full, new_size, self.seq_lengths, self.mask_mod
        )

    def __repr__(self) -> str:
        return self.to_string()

    def to_string(
        self, grid_size: int | tuple[int, int] | None = (16, 16), limit: int = 4
    ) -> str:
        """The block pattern drawn as text: `██` full, `░░` partial, blank skipped.

        **Arguments:**

        - `grid_size`: the most rows and columns of cells drawn, `(rows, cols)` or an
            int for both; a larger pattern is downsampled (a cell shows the densest
            block it covers). `None` (or -1, PyTorch's spelling) draws every block.
            The default keeps `print(block_mask)` short at any length.
        - `limit`: the most `(batch, head)` pairs drawn.
        """
        head = (
            f"BlockMask(shape={self.shape}, block_size={self.block_size}, "
            f"mask_mod={_mod_name(self.mask_mod)}"
        )
        if any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(self)):
            return head + ")"  # traced: nothing to draw
        if grid_size is None or grid_size == -1:
            grid = None
        else:
            grid = _pair(grid_size, "grid_size")
        partial, full = map(np.asarray, self.block_states())
        dense = partial | full
        lines = [head + f", sparsity={100 * (1 - dense.mean()):.2f}%)"]
        b, h, mq, nkv = dense.shape
        shown = [(i, j) for i in range(b) for j in range(h)][:limit]
        for i, j in shown:
            lines.append(f"({i}, {j})")
            lines.extend(_draw(partial[i, j], full[i, j], grid))
        if len(shown) < b * h:
            lines.append(f"... ({b * h - len(shown)} more (batch, head) pairs)")
        if grid is not None and (mq > grid[0] or nkv > grid[1]):
            lines.append(
                f"({mq} x {nkv} blocks drawn as at most {grid[0]} x {grid[1]} cells; "
                "`block_mask.to_string(grid_size=None)` draws every block)"
            )
        return "\n".join(lines)

    __str__ = __repr__


def _keepdim(i, n: int, name: str):
    if isinstance(i, int | np.integer):
        if not -n <= i < n:
            raise IndexError(
                f"BlockMask {name} index {i} is out of range for size {n}."
            )
        i = int(i) % n
        return slice(i, i + 1)
    if isinstance(i, slice):
        return i
    raise TypeError(
        f"BlockMask indices must be ints or slices, got {type(i).__name__}."
    )


def _resize_axis(partial, full, axis: int, old: int, new: int, length: int):
    """Block states `(partial, full)` along `axis` converted from blocks of `old` to
    blocks of `new` positions (one a multiple of the other), for `length` positions."""
    n = math.ceil(length / new)
    partial, full = (jnp.moveaxis(x, axis, -1) for x in (partial, full))
    if new > old:
        # Coarsen: sub-blocks past the sequence end (padding) are neutral.
        r = new // old
        pad = [(0, 0)] * (partial.ndim - 1) + [(0, n * r - partial.shape[-1])]
        split = lambda x: x.reshape(*x.shape[:-1], n, r)
        anyk = jnp.any(split(jnp.pad(partial | full, pad, constant_values=False)), -1)
        allk = jnp.all(split(jnp.pad(full, pad, constant_values=True)), -1)
        partial, full = anyk & ~allk, allk
    else:
        # Refine: each sub-block inside the sequence inherits its parent's state.
        r = old // new
        partial, full = (jnp.repeat(x, r, axis=-1)[..., :n] for x in (partial, full))
    return tuple(jnp.moveaxis(x, -1, axis) for x in (partial, full))


def _draw(
    partial: np.ndarray, full: np.ndarray, grid: tuple[int, int] | None
) -> list[str]:
    """Draws a block pattern: '██' full, '░░' partial, '  ' skipped.

    Patterns larger than `grid` (rows, cols) are downsampled; a cell shows the
    densest block it covers.
    """
    state = np.where(full, 2, np.where(partial, 1, 0))
    rows, cols = state.shape
    if grid is not None:
        fr, fc = math.ceil(rows / grid[0]), math.ceil(cols / grid[1])
    else:
        fr = fc = 1
    if fr > 1 or fc > 1:
        pad = np.zeros((math.ceil(rows / fr) * fr, math.ceil(cols / fc) * fc), int)
        pad[:rows, :cols] = state
        state = pad.reshape(pad.shape[0] // fr, fr, pad.shape[1] // fc, fc).max((1, 3))
    chars = np.array(["  ", "░░", "██"])
    return ["".join(chars[r]).rstrip() for r in state]


def create_mask(
    mask_mod: Callable,
    B: int | None,
    H: int | None,
    Q_LEN: int,
    KV_LEN: int,
    device: Any = None,
) -> Bool[Array, "b h q_len kv_len"]:
    """Evaluates `mask_mod` densely: a bool array of shape `(B, H, Q_LEN, KV_LEN)`.

    `B` or `H` of `None` means 1 (broadcast). Memory is O(Q_LEN * KV_LEN): for long
    sequences build a [`BlockMask`][eqx_flexattn.BlockMask] instead. `device` is
    accepted for PyTorch compatibility and ignored: JAX places arrays (on the default
    device; use `jax.device_put` or `jax.default_device` to choose).

    !!! Example

        ```python
        dense = create_mask(causal_mask, None, None, 4, 4)   # lower triangle
        ```
    """
    _note_device(device)
    b, h = _check_batch("B", B), _check_batch("H", H)
    lq, lkv = _check_length("Q_LEN", Q_LEN), _check_length("KV_LEN", KV_LEN)
    check_mod_shape(mask_mod, b, h, lq, lkv)
    return convert_mask_mod(mask_mod)(*index_grid(b, h, lq, lkv))


def create_block_mask(
    mask_mod: Callable,
    B: int | None,
    H: int | None,
    Q_LEN: int,
    KV_LEN: int,
    device: Any = None,
    *,
    block_size: int | tuple[int, int] | None = None,
    BLOCK_SIZE: int | tuple[int, int] | None = None,
    _compile: bool = False,
) -> BlockMask:
    """Builds the [`BlockMask`][eqx_flexattn.BlockMask] of `mask_mod`.

    **Arguments:**

    - `mask_mod`: `mask_mod(b, h, q_idx, kv_idx) -> bool`, written for scalar int32
        indices. A function, or an `eqx.Module` whose arrays are data.
    - `B`, `H`: batch size and number of query heads; `None` means 1 (broadcast over
        every batch element or head).
    - `Q_LEN`, `KV_LEN`: sequence lengths; need not be multiples of the block size.
    - `device`: ignored (PyTorch's argument): JAX places arrays, on the default
        device; choose with `jax.device_put` or `jax.default_device`.
    - `block_size`: an int, or `(block_q, block_kv)`; default 128. PyTorch's
        spelling `BLOCK_SIZE` is accepted too.
    - `_compile`: ignored (PyTorch's argument): call `create_block_mask` inside
        `jax.jit` (or wrap it in `eqx.filter_jit`) to compile it.

    **Returns:** a `BlockMask` for inputs of shape `(B, H, Q_LEN, ·)` and
    `(B, ·, KV_LEN, ·)`.

    The mask is evaluated a few query blocks at a time, never as one
    `Q_LEN x KV_LEN` array, so memory stays bounded at any length; it is jittable
    (the sizes are static).

    !!! Example

        ```python
        bm = create_block_mask(causal_mask, None, None, 4096, 4096)
        out = flex_attention(q, k, v, block_mask=bm)
        ```
    """
    del _compile
    _note_device(device)
    b, h = _check_batch("B", B), _check_batch("H", H)
    lq, lkv = _check_length("Q_LEN", Q_LEN), _check_length("KV_LEN", KV_LEN)
    bq, bkv = _block_size_arg(block_size, BLOCK_SIZE)
    check_mod_shape(mask_mod, b, h, lq, lkv)
    partial, full = _block_states(convert_mask_mod(mask_mod), b, h, lq, lkv, bq, bkv)
    return BlockMask._from_dense(partial, full, (bq, bkv), (lq, lkv), mask_mod)


def full_block_mask(
    Q_LEN: int, KV_LEN: int, block_size: int | tuple[int, int] = DEFAULT_BLOCK_SIZE
) -> BlockMask:
    """The mask that attends everywhere: one broadcast batch and head, every block
    full, so the mask mod (`noop_mask`) is never evaluated."""
    lq, lkv = _check_length("Q_LEN", Q_LEN), _check_length("KV_LEN", KV_LEN)
    bq, bkv = _pair(block_size, "block_size")
    shape = (1, 1, math.ceil(lq / bq), math.ceil(lkv / bkv))
    return BlockMask._from_dense(
        jnp.zeros(shape, bool), jnp.ones(shape, bool), (bq, bkv), (lq, lkv), noop_mask
    )


def _block_states(mod, b: int, h: int, lq: int, lkv: int, bq: int, bkv: int):
    """(partial, full) bool arrays (b, h, Mq, Nkv) of a mask mod.

    A `lax.map` over chunks of (batch x head, query blocks, key blocks), each of at
    most `_MASK_CHUNK_ELEMENTS` elements (or one block), so memory is bounded at any
    size.
    """
    mq, nkv = math.ceil(lq / bq), math.ceil(lkv / bkv)
    budget = _MASK_CHUNK_ELEMENTS
    kv_per = min(nkv, max(1, budget // (bq * bkv)))
    q_per = min(mq, max(1, budget // (bq * kv_per * bkv)))
    bh_per = min(b * h, max(1, budget // (q_per * bq * kv_per * bkv)))
    n_bh, n_q, n_kv = (
        math.ceil(b * h / bh_per),
        math.ceil(mq / q_per),
        math.ceil(nkv / kv_per),
    )

    def chunk(step):
        i_bh, i_q, i_kv = step // (n_q * n_kv), (step // n_kv) % n_q, step % n_kv
        bh = jnp.minimum(
            i_bh * bh_per + jnp.arange(bh_per, dtype=INDEX_DTYPE), b * h - 1
        )
        iq = i_q * q_per * bq + jnp.arange(q_per * bq, dtype=INDEX_DTYPE)
        ikv = i_kv * kv_per * bkv + jnp.arange(kv_per * bkv, dtype=INDEX_DTYPE)
        iq, ikv = iq.reshape(1, -1, 1), ikv.reshape(1, 1, -1)
        in_bounds = (iq < lq) & (ikv < lkv)
        keep = mod(
            (bh // h).reshape(-1, 1, 1),
            (bh % h).reshape(-1, 1, 1),
            jnp.minimum(iq, lq - 1),
            jnp.minimum(ikv, lkv - 1),
        )
        shape = (bh_per, q_per, bq, kv_per, bkv)
        anyk = jnp.any((keep & in_bounds).reshape(shape), axis=(2, 4))
        allk = jnp.all((keep | ~in_bounds).reshape(shape), axis=(2, 4))
        return anyk & ~allk, anyk & allk

    def assemble(x):  # (steps, bh_per, q_per, kv_per) -> (b, h, mq, nkv)
        x = x.reshape(n_bh, n_q, n_kv, bh_per, q_per, kv_per)
        x = x.transpose(0, 3, 1, 4, 2, 5)
        x = x.reshape(n_bh * bh_per, n_q * q_per, n_kv * kv_per)[: b * h, :mq, :nkv]
        return x.reshape(b, h, mq, nkv)

    states = jax.lax.map(chunk, jnp.arange(n_bh * n_q * n_kv))
    return tuple(map(assemble, states))
