"""The `mosaic` backend: Pallas Mosaic GPU kernels for NVIDIA Hopper (sm90) and newer.

The forward pass is the block-sparse FlashAttention-3-style kernel of
`_forward`; the backward pass runs the dQ and dK/dV kernels of `_backward`
(score-mod parameter gradients from the kernels' per-row and per-diagonal partials),
or the `xla` backend's backward where those kernels decline (head dims over 128,
gradients of per-key float tables, buffers over the shared memory), fed with the
forward kernel's output and log-sum-exp.

The package: this module (options, checks, the block lists, padding); `_forward`
and `_backward` (the kernels, each with its named scratch buffers and hand-offs);
`_pipeline` (warp specialisation and register budgets, the producer's TMA ring, the
named-barrier registry, scoped buffers by name and their shared-memory size, batched
wgmmas); `_mod_tiles` (score and mask mods on register tiles) and `_tile_eval` (a
mod's scalar program on row and column vectors). Shared with other backends:
`_tiles` (softmax tile math) and `_reduce` (table-gradient reductions).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array


if jax.__version_info__ < (0, 11):  # the registry turns this into a decline reason
    raise ImportError(
        f"the Mosaic GPU kernels need jax >= 0.11, this is jax {jax.__version__}"
    )

from ..._block_mask import BlockMask
from ..._mods import INDEX_DTYPE, kernel_mod, kernel_mod_specs, KernelMod
from .._base import AbstractBackend, AttentionProblem, grads_like
from .._config import AbstractConfig, check_bool
from .._reduce import diagonal_partials, reduce_table_grads, table_vjp
from .._tiles import LOG2_E
from ..xla import XlaBackend
from . import _backward, _forward


logger = logging.getLogger("eqx_flexattn")

# jax 0.12's Mosaic GPU layout inference fails on (or takes forever over) the
# shared-memory shear of `_mod_tiles.diagonal_sums`; its interpreter runs it.
_DIAGONAL_SUMS_UNLOWERED = jax.__version_info__ >= (0, 12)


class MosaicConfig(AbstractConfig):
    """Options of the `mosaic` backend.

    - `block_q`: query rows per consumer warpgroup (64, the wgmma height); a program
        runs two consumer warpgroups, `2 * block_q` rows: one BlockMask row.
    - `block_kv`: keys per tile: 64, 128 or 256 (default 128, 64 for head dims over
        128). PyTorch's `BLOCK_N` sets it.
    - `num_stages`: depth of the K/V shared-memory ring, 2 to 4 (default 2; shared
        memory limits it: at D=128 and `block_kv=128` only 2 fit). PyTorch's
        `num_stages` sets it. A config whose buffers exceed the GPU's shared memory
        (227 KiB a block on sm90) declines, saying how many bytes it needs; where
        only the backward's do not fit, the `xla` backward runs.
    - `persistent`: run the forward as a persistent kernel, one program per SM
        walking its share of the query tiles (heaviest first) with the K/V ring
        streaming on across tiles, instead of one program per tile (default False:
        on an H200 it measured 3-16% slower, see `benchmarks/notes`).
    - `interpret`: run in the Pallas Mosaic GPU interpreter (on CPU, for tests).
    """

    block_q: int = eqx.field(static=True, default=64)
    block_kv: int | None = eqx.field(static=True, default=None)
    num_stages: int = eqx.field(static=True, default=2)
    persistent: bool = eqx.field(static=True, default=False)
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
        check_bool("mosaic", "persistent", self.persistent)
        check_bool("mosaic", "interpret", self.interpret)

    def kv_tile(self, head_dim: int) -> int:
        if self.block_kv is not None:
            return self.block_kv
        return 128 if head_dim <= 128 else 64


INTERPRET_PROGRAMS = 3  # persistent programs in the interpreter (each takes several)


def _programs(cfg: MosaicConfig) -> int:
    """Programs of a persistent forward: one per SM (0: not persistent)."""
    if not cfg.persistent:
        return 0
    if cfg.interpret:
        return INTERPRET_PROGRAMS
    # Lowering for the GPU on a host without one (tests): an H100/H200's SM count.
    return int(getattr(jax.devices()[0], "core_count", None) or 132)


def _pad_to(x: Array, axis: int, size: int, value=0) -> Array:
    pad = size - x.shape[axis]
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths, constant_values=value)


def _mask_at(problem: AttentionProblem, rows: int, cols: int) -> BlockMask:
    """The problem's BlockMask at a kernel's tiles `(rows, cols)`."""
    bm = problem.block_mask
    return bm if bm.block_size == (rows, cols) else bm.at_block_size(rows, cols)


def _block_lists(problem: AttentionProblem, rows: int, cols: int, kv_ragged: bool):
    """(counts (B|1, H|1, Mq, 2), blocks (B|1, H|1, Mq, Nkv)) at the kernel's tiles:
    each query block's number of full blocks and of all blocks, and its key blocks,
    full ones first. A ragged last key block is always partial (its padding must be
    masked)."""
    (p_num, p_idx), (f_num, f_idx) = _mask_at(problem, rows, cols).block_lists()
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
    """Pallas Mosaic GPU kernels (Hopper and newer GPUs): see `_forward`.

    Options: [`MosaicConfig`][] (`kernel_options={"mosaic": {"num_stages": 3}}`).
    """

    name = "mosaic"
    config_class = MosaicConfig
    interpretable = True
    runs_per_shard = True

    def check(self, problem: AttentionProblem) -> None:
        cfg = self.config(problem)
        if not cfg.interpret:
            dev = jax.devices()[0]
            cc = getattr(dev, "compute_capability", None)
            if dev.platform != "gpu" or cc is None:
                raise NotImplementedError(
                    "it needs an NVIDIA GPU (sm90 or newer); JAX runs on "
                    f"{dev.platform}."
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
        for mod in (problem.score_mod, problem.mask_mod):
            if mod is not None:
                kernel_mod_specs(mod)  # raises for a mod the kernels can't take
        # A config whose buffers exceed the shared memory: a decline, not a
        # compile error.
        shape = _forward.ForwardShape(**self._sizes(problem, cfg), block_q=cfg.block_q)
        _forward.check_fits(shape, dtype)

    def _padded(self, problem, cfg):
        lq, lkv = problem.q.shape[2], problem.k.shape[2]
        rows = _forward.tile_rows(cfg.block_q)
        cols = cfg.kv_tile(problem.q.shape[-1])
        return _forward.padded(lq, rows), _forward.padded(lkv, cols)

    def _sizes(self, problem, cfg) -> dict:
        """The kernels' static sizes: lengths padded to the tiles, head dims to
        multiples of 64 (zero padding leaves q·k and the output unchanged)."""
        b, hq, lq, d = problem.q.shape
        hkv, lkv, dv = problem.v.shape[1:]
        lq_pad, lkv_pad = self._padded(problem, cfg)
        d_pad, dv_pad = 64 * math.ceil(d / 64), 64 * math.ceil(dv / 64)
        return dict(
            b=b,
            hq=hq,
            hkv=hkv,
            lq=lq,
            lkv=lkv,
            lq_pad=lq_pad,
            lkv_pad=lkv_pad,
            d=d_pad,
            dv=dv_pad,
            block_kv=cfg.kv_tile(d_pad),
            num_stages=cfg.num_stages,
            scale=problem.scale,
            interpret=cfg.interpret,
        )

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
        lq, lkv, dv = q.shape[2], v.shape[2], v.shape[3]
        sizes = self._sizes(problem, cfg)
        lq_pad, lkv_pad, d_pad, dv_pad = (
            sizes[n] for n in ("lq_pad", "lkv_pad", "d", "dv")
        )
        bkv = sizes["block_kv"]
        shape = _forward.ForwardShape(
            **sizes, block_q=cfg.block_q, programs=_programs(cfg)
        )
        counts, blocks = _block_lists(
            problem, _forward.tile_rows(cfg.block_q), bkv, lkv_pad != lkv
        )
        score, mask = self._mods(problem, lq_pad, lkv_pad)
        qp = _pad_to(_pad_to(q, 2, lq_pad), 3, d_pad)
        kp = _pad_to(_pad_to(k, 2, lkv_pad), 3, d_pad)
        vp = _pad_to(_pad_to(v, 2, lkv_pad), 3, dv_pad)
        out, lse = _forward.forward(shape, qp, kp, vp, counts, blocks, score, mask)
        return out[:, :, :lq, :dv], lse[:, :, :lq]

    def backward(self, problem, out, lse, dout, dlse, perturbed) -> Any:
        need_mod = perturbed.score_mod is not None and any(
            jax.tree_util.tree_leaves(perturbed.score_mod)
        )
        reason = self._backward_declines(problem, need_mod)
        if reason is not None:
            logger.debug("mosaic backward: the xla backward runs: %s", reason)
            return XlaBackend().backward(problem, out, lse, dout, dlse, perturbed)
        if dout is None:
            dout = jnp.zeros_like(out)
        cfg = self.config(problem)
        q, k, v = problem.q, problem.k, problem.v
        hkv, lq, d, lkv, dv = k.shape[1], q.shape[2], q.shape[3], v.shape[2], v.shape[3]
        sizes = self._sizes(problem, cfg)
        lq_pad, lkv_pad, d_pad, dv_pad = (
            sizes[n] for n in ("lq_pad", "lkv_pad", "d", "dv")
        )
        bkv = sizes["block_kv"]
        shape = _backward.BackwardShape(**sizes)
        # The prologue: delta = rowsum(dO * O) (less dlse), lse in base 2 with +inf
        # for fully masked rows (their P is then 0).
        finite = jnp.isfinite(lse)
        delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
        if dlse is not None:
            delta = delta - jnp.where(finite, dlse.astype(jnp.float32), 0.0)
        lse2 = jnp.where(finite, lse * LOG2_E, jnp.inf)
        lse2 = _pad_to(lse2, 2, lq_pad, jnp.inf)
        delta = _pad_to(delta, 2, lq_pad)
        qp = _pad_to(_pad_to(q, 2, lq_pad), 3, d_pad)
        kp = _pad_to(_pad_to(k, 2, lkv_pad), 3, d_pad)
        vp = _pad_to(_pad_to(v, 2, lkv_pad), 3, dv_pad)
        dop = _pad_to(_pad_to(dout, 2, lq_pad), 3, dv_pad)
        score, mask = self._mods(problem, lq_pad, lkv_pad)
        kv_ragged = lkv_pad != lkv
        # Float tables: "scalar" and "q" ones get gradients from the dQ kernel,
        # "diag" ones from the dK/dV kernel.
        learnt = {
            sp.kind
            for sp in (score.specs if need_mod else ())
            if jnp.issubdtype(sp.dtype, jnp.floating)
        }
        need_diag = "diag" in learnt

        operands = (qp, kp, vp, dop, lse2, delta)  # both kernels' leading inputs
        dq = dmod = None
        row_grads = {}
        if perturbed.q or learnt & {"scalar", "q"}:
            rows = _forward.tile_rows(cfg.block_q)
            counts, blocks = _block_lists(problem, rows, bkv, kv_ragged)
            dq, row_grads = _backward.dq_kernel(
                shape, *operands, counts, blocks, score, mask, need_mod
            )
            dq = dq[:, :, :lq, :d] if perturbed.q else None
        dk = dv_ = None
        if perturbed.k or perturbed.v or need_diag:
            dkv_mask = _mask_at(problem, *_backward.DKV_TILES)
            hq = problem.q.shape[1]
            counts, work = _work_lists(dkv_mask, hq, hkv, lq_pad // 64, kv_ragged)
            dk, dv_, diag_partials = _backward.dkv_kernel(
                shape, *operands, counts, work, score, mask, need_diag
            )
            if perturbed.k or perturbed.v:
                dk, dv_ = dk[:, :, :lkv, :d], dv_[:, :, :lkv, :dv]
            else:  # run for the diagonal sums alone
                dk = dv_ = None
            if diag_partials:
                visited = _visited_tiles(dkv_mask, lq_pad, lkv_pad)
                for i, part in diag_partials.items():
                    row_grads[i] = diagonal_partials(
                        part, visited, lq_pad, score.specs[i]
                    )
        if need_mod:
            dmod = _table_vjp(problem, score, row_grads, lq_pad, lkv_pad)
        return grads_like(problem, dq, dk, dv_, dmod)

    def _backward_declines(self, problem, need_mod: bool) -> str | None:
        """Why the backward kernels can't take `problem` (None: they can)."""
        d, dv = problem.q.shape[-1], problem.v.shape[-1]
        if max(d, dv) > 128:
            return f"head dims over 128 (D={d}, Dv={dv}) exceed the registers"
        if need_mod:
            for spec in kernel_mod_specs(problem.score_mod):
                if not jnp.issubdtype(spec.dtype, jnp.floating):
                    continue
                if spec.kind == "kv":
                    return "gradients of per-key score-mod tables are not in the kernel"
                if spec.kind == "diag" and _DIAGONAL_SUMS_UNLOWERED:
                    if not self.config(problem).interpret:
                        return (
                            "the diagonal sums behind relative-position table "
                            f"gradients do not lower with jax {jax.__version__} "
                            "(its Mosaic GPU layout inference; lowered and run "
                            "on jax 0.11)"
                        )
        specs = None
        if problem.score_mod is not None:
            specs = kernel_mod_specs(problem.score_mod)
        shape = _backward.BackwardShape(**self._sizes(problem, self.config(problem)))
        try:
            _backward.check_fits(shape, problem.q.dtype, specs, need_mod)
        except NotImplementedError as e:
            return str(e)
        return None


def _visited_tiles(bm: BlockMask, lq_pad: int, lkv_pad: int):
    """`(B|1, H|1, Lkv_pad / 64, Lq_pad / 64)` bool: the 64x64 tiles (key tile, query
    tile) that the dK/dV kernel computes from `bm` (at `_backward.DKV_TILES`: its
    key blocks are 128 keys)."""
    # Unchecked: the dK/dV kernel ran on these same lists (and the checks'
    # `eqx.error_if` would not lower for the GPU off one).
    partial, full = bm._states(check=False)
    blocks = partial | full  # (B|1, H|1, Mq, Nkv)
    blocks = _pad_to(_pad_to(blocks, 2, lq_pad // 64, False), 3, lkv_pad // 128, False)
    return jnp.repeat(blocks.swapaxes(2, 3), 2, axis=2)


def _table_vjp(problem, score: KernelMod, row_grads: dict, lq_pad: int, lkv_pad: int):
    """Gradients of the score mod's arrays from the kernels' partials of its tables'
    gradients (the dQ kernel's per-query-row sums of "scalar" and "q" tables, a
    "scalar" table's rows being its program axis; the dK/dV kernel's diagonal sums
    of "diag" tables): reduced in float32 in a fixed order, then pulled back through
    the table construction."""
    b, hq, lq, _ = problem.q.shape
    lkv = problem.k.shape[2]
    partials = [row_grads.get(i) for i in range(len(score.specs))]
    grads = reduce_table_grads(partials, score.specs, score.tables)
    build = lambda m: kernel_mod(m, b, hq, lq, lkv, lq_pad=lq_pad, lkv_pad=lkv_pad)
    return table_vjp(build, problem.score_mod, grads)


def _work_lists(bm: BlockMask, hq: int, hkv: int, mq_pad: int, kv_ragged: bool):
    """The dK/dV kernel's lists from `bm` (at `_backward.DKV_TILES`): per (batch, kv
    head, 128-key block), the 64-row query tiles of every query head of the group, coded
    `j * mq_pad + i` (`mq_pad`: the kernel's number of query tiles, `Lq_pad / 64`),
    full ones first; `counts (B|1, Hkv, Nkv, 2)` (full, all). Every tile of a ragged
    last key block counts as partial (its padded keys must be masked)."""
    (p_num, p_idx), (f_num, f_idx) = bm.block_lists(transposed=True)
    mb, mh, nkv, mq = p_idx.shape
    g = hq // hkv

    def by_group(num, idx):
        # (B|1, Hq, Nkv, Mq) -> codes (B|1, Hkv, Nkv, G*Mq) with validity.
        num = jnp.broadcast_to(num, (mb, hq, nkv))
        idx = jnp.broadcast_to(idx, (mb, hq, nkv, mq))
        j = jnp.arange(hq, dtype=INDEX_DTYPE).reshape(1, hkv, g, 1, 1) % g
        idx = idx.reshape(mb, hkv, g, nkv, mq)
        valid = jnp.arange(mq) < num.reshape(mb, hkv, g, nkv)[..., None]
        code = j * mq_pad + idx
        code = jnp.moveaxis(code, 2, 3).reshape(mb, hkv, nkv, g * mq)
        valid = jnp.moveaxis(valid, 2, 3).reshape(mb, hkv, nkv, g * mq)
        order = jnp.argsort(~valid, axis=-1, stable=True)
        return (
            jnp.sum(valid, axis=-1, dtype=INDEX_DTYPE),
            jnp.take_along_axis(code, order, axis=-1),
        )

    n_full, full = by_group(f_num, f_idx)
    n_part, part = by_group(p_num, p_idx)
    n = full.shape[-1]
    t = jnp.arange(n, dtype=INDEX_DTYPE)
    from_part = jnp.clip(t - n_full[..., None], 0, n - 1)
    work = jnp.where(
        t < n_full[..., None], full, jnp.take_along_axis(part, from_part, axis=-1)
    )
    n_unmasked = n_full
    if kv_ragged:
        last = jnp.arange(nkv) == nkv - 1
        n_unmasked = jnp.where(last, 0, n_full)
    counts = jnp.stack([n_unmasked, n_full + n_part], axis=-1)
    return counts.astype(INDEX_DTYPE), work.astype(INDEX_DTYPE)
