"""The `mosaic` backend: Pallas Mosaic GPU kernels for NVIDIA Hopper (sm90) and newer.

The forward pass is the block-sparse FlashAttention-3-style kernel of
`_mosaic_fwd`; the backward pass is, for now, the `xla` backend's, fed with this
kernel's output and log-sum-exp.
"""

from __future__ import annotations

import math
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array

from .._mods import INDEX_DTYPE, KernelMod, kernel_mod
from . import _mosaic_fwd
from ._base import AbstractBackend, AttentionProblem
from ._config import AbstractConfig, check_bool
from .xla import XlaBackend


class MosaicConfig(AbstractConfig):
    """Options of the `mosaic` backend.

    - `block_q`: query rows per consumer warpgroup (64, the wgmma height); a program
        runs two consumer warpgroups, `2 * block_q` rows: one BlockMask row.
    - `block_kv`: keys per tile: 64, 128 or 256 (default 128, 64 for head dims over
        128). PyTorch's `BLOCK_N` sets it.
    - `num_stages`: depth of the K/V shared-memory ring, 2 to 4 (default 2; shared
        memory limits it: at D=128 and `block_kv=128` only 2 fit). PyTorch's
        `num_stages` sets it.
    - `interpret`: run in the Pallas Mosaic GPU interpreter (on CPU, for tests).
    """

    block_q: int = eqx.field(static=True, default=64)
    block_kv: int | None = eqx.field(static=True, default=None)
    num_stages: int = eqx.field(static=True, default=2)
    interpret: bool = eqx.field(static=True, default=False)

    torch_names = {"BLOCK_N": "block_kv", "num_stages": "num_stages"}

    def __check_init__(self):
        if self.block_q != 64:
            raise ValueError(
                f"mosaic backend: kernel_options['block_q'] must be 64, got "
                f"{self.block_q!r}."
            )
        if self.block_kv is not None and self.block_kv not in (64, 128, 256):
            raise ValueError(
                "mosaic backend: kernel_options['block_kv'] must be 64, 128 or 256, "
                f"got {self.block_kv!r}."
            )
        if self.num_stages not in (2, 3, 4) or isinstance(self.num_stages, bool):
            raise ValueError(
                "mosaic backend: kernel_options['num_stages'] must be 2, 3 or 4, got "
                f"{self.num_stages!r}."
            )
        check_bool("mosaic", "interpret", self.interpret)

    def kv_tile(self, head_dim: int) -> int:
        if self.block_kv is not None:
            return self.block_kv
        return 128 if head_dim <= 128 else 64


def _pad_to(x: Array, axis: int, size: int) -> Array:
    pad = size - x.shape[axis]
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths)


def _block_lists(problem: AttentionProblem, rows: int, cols: int, kv_ragged: bool):
    """(counts (B|1, H|1, Mq, 2), blocks (B|1, H|1, Mq, Nkv)) at the kernel's tiles:
    each query block's number of full blocks and of all blocks, and its key blocks,
    full ones first. A ragged last key block is always partial (its padding must be
    masked)."""
    bm = problem.block_mask
    if bm.block_size != (rows, cols):
        bm = bm.at_block_size(rows, cols)
    (p_num, p_idx), (f_num, f_idx) = bm.block_lists()
    n = p_idx.shape[-1]
    j = jnp.arange(n, dtype=INDEX_DTYPE)
    f_valid = j < f_num[..., None]
    n_unmasked = f_num
    if kv_ragged:
        # Move the last key block, if full, to the end of the full list and mask it.
        is_last = f_valid & (f_idx == n - 1)
        order = jnp.argsort(jnp.where(f_valid, is_last, 2), axis=-1, stable=True)
        f_idx = jnp.take_along_axis(f_idx, order, axis=-1)
        n_unmasked = f_num - jnp.any(is_last, axis=-1)
    from_partial = jnp.clip(j - f_num[..., None], 0, n - 1)
    blocks = jnp.where(
        j < f_num[..., None],
        f_idx,
        jnp.take_along_axis(p_idx, from_partial, axis=-1),
    )
    counts = jnp.stack([n_unmasked, f_num + p_num], axis=-1)
    return counts.astype(INDEX_DTYPE), blocks.astype(INDEX_DTYPE)


class MosaicBackend(AbstractBackend):
    """Pallas Mosaic GPU kernels (Hopper and newer GPUs): see `_mosaic_fwd`.

    Options: [`MosaicConfig`][] (`kernel_options={"mosaic": {"num_stages": 3}}`).
    """

    name = "mosaic"
    config_class = MosaicConfig
    interpretable = True

    def check(self, problem: AttentionProblem) -> None:
        cfg = self.config(problem)
        if not cfg.interpret:
            dev = jax.devices()[0]
            cc = getattr(dev, "compute_capability", None)
            if dev.platform != "gpu" or cc is None:
                raise NotImplementedError(
                    f"it needs an NVIDIA GPU (sm90 or newer); JAX runs on {dev.platform}."
                )
            if float(cc) < 9.0:
                raise NotImplementedError(
                    f"it needs an sm90 (Hopper) or newer GPU; this one is sm{cc}."
                )
        dtype = problem.q.dtype
        if dtype not in (jnp.bfloat16, jnp.float16):
            raise NotImplementedError(
                f"it takes bfloat16 or float16 inputs, got {dtype}."
            )
        d, dv = problem.q.shape[-1], problem.v.shape[-1]
        if max(d, dv) > 256:
            raise NotImplementedError(
                f"it takes head dims up to 256, got D={d}, Dv={dv}."
            )
        self._mods(problem, *self._padded(problem, cfg))

    def _padded(self, problem, cfg):
        lq, lkv = problem.q.shape[2], problem.k.shape[2]
        rows = _mosaic_fwd.tile_rows(cfg.block_q)
        cols = cfg.kv_tile(problem.q.shape[-1])
        return _mosaic_fwd.padded(lq, rows), _mosaic_fwd.padded(lkv, cols)

    def _mods(self, problem, lq_pad, lkv_pad) -> tuple[KernelMod | None, KernelMod]:
        b, hq, lq, _ = problem.q.shape
        lkv = problem.k.shape[2]
        sizes = (b, hq, lq, lkv)
        score = None
        if problem.score_mod is not None:
            score = kernel_mod(
                problem.score_mod, *sizes, lq_pad=lq_pad, lkv_pad=lkv_pad
            )
        mask = kernel_mod(problem.mask_mod, *sizes, lq_pad=lq_pad, lkv_pad=lkv_pad)
        return score, mask

    def forward(self, problem: AttentionProblem) -> tuple[Array, Array]:
        cfg = self.config(problem)
        q, k, v = problem.q, problem.k, problem.v
        b, hq, lq, d = q.shape
        hkv, lkv, dv = v.shape[1:]
        lq_pad, lkv_pad = self._padded(problem, cfg)
        d_pad, dv_pad = 64 * math.ceil(d / 64), 64 * math.ceil(dv / 64)
        bkv = cfg.kv_tile(d_pad)
        shape = _mosaic_fwd.ForwardShape(
            b=b, hq=hq, hkv=hkv, lq=lq, lkv=lkv, lq_pad=lq_pad, lkv_pad=lkv_pad,
            d=d_pad, dv=dv_pad, block_q=cfg.block_q, block_kv=bkv,
            num_stages=cfg.num_stages, scale=problem.scale, interpret=cfg.interpret,
        )
        counts, blocks = _block_lists(
            problem, _mosaic_fwd.tile_rows(cfg.block_q), bkv, lkv_pad != lkv
        )
        score, mask = self._mods(problem, lq_pad, lkv_pad)
        qp = _pad_to(_pad_to(q, 2, lq_pad), 3, d_pad)
        kp = _pad_to(_pad_to(k, 2, lkv_pad), 3, d_pad)
        vp = _pad_to(_pad_to(v, 2, lkv_pad), 3, dv_pad)
        out, lse = _mosaic_fwd.forward(shape, qp, kp, vp, counts, blocks, score, mask)
        return out[:, :, :lq, :dv], lse[:, :, :lq]

    def backward(self, problem, out, lse, dout, dlse, perturbed) -> Any:
        return XlaBackend().backward(problem, out, lse, dout, dlse, perturbed)
