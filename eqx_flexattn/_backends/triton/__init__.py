"""The `triton` backend: block-sparse Pallas kernels lowered through Triton, for
every NVIDIA GPU from Ampere (sm80) on, in float16, bfloat16 and float32.

See `_kernels` for the kernels and `_configs` for the choice of tiles. Score-mod
parameter gradients come from the kernels, per table kind: the dQ kernel's row sums
for tables read per program or per query row (ALiBi slopes, head biases), its per-tile
diagonal sums for relative-position tables (on 64x64 backward tiles), the dK/dV
kernel's per-key sums for per-key tables; all reduced in a fixed order by `_reduce`
(no atomics). Where 64x64 backward tiles do not fit the card, the `xla` backward runs
on the forward kernel's output and log-sum-exp.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array

from ..._block_mask import BlockMask
from ..._mods import INDEX_DTYPE, kernel_mod, kernel_mod_specs
from .._base import AbstractBackend, AttentionProblem, grads_like
from .._config import AbstractConfig, check_bool, check_positive_int
from .._reduce import diagonal_partials, reduce_table_grads, table_vjp
from .._tiles import LOG2_E
from ..xla import XlaBackend
from . import _configs, _kernels
from ._configs import DEVICE_KINDS


logger = logging.getLogger("eqx_flexattn")

DTYPES = (jnp.float16, jnp.bfloat16, jnp.float32)
F32_PRECISIONS = ("tf32", "tf32x3", "ieee")


class TritonConfig(AbstractConfig):
    """Options of the `triton` backend (all optional: the defaults are chosen per GPU,
    head dim and dtype from a shared-memory and register estimate).

    - `block_q`, `block_kv`: the forward's tile (query rows, keys), powers of two
        from 16. PyTorch's `BLOCK_M`, `BLOCK_N` set them.
    - `num_warps`, `num_stages`: the forward's warps per program and software
        pipeline depth. PyTorch's `num_warps`, `num_stages` set them.
    - `bwd_block_q`, `bwd_block_kv`, `bwd_num_warps`, `bwd_num_stages`: the same for
        the two backward kernels (PyTorch's `BLOCK_M1`/`BLOCK_M2`, `BLOCK_N1`/
        `BLOCK_N2`, `bwd_num_warps`, `bwd_num_stages`).
    - `f32_precision`: the matmuls of float32 inputs: `"tf32"`, `"tf32x3"` (three
        TF32 products, close to float32) or `"ieee"` (float32 FMA). Default: JAX's
        matmul precision (`jax.default_matmul_precision`): `"ieee"` under
        `"highest"`/`"float32"`, else `"tf32"`.
    - `compute_capability`: compile for this GPU (`"8.0"`, `"8.9"`, ...) instead of
        the one JAX runs on: for lowering on a host without it.
    - `interpret`: run in Pallas interpret mode (on CPU, for tests).
    """

    block_q: int | None = eqx.field(static=True, default=None)
    block_kv: int | None = eqx.field(static=True, default=None)
    num_warps: int | None = eqx.field(static=True, default=None)
    num_stages: int | None = eqx.field(static=True, default=None)
    bwd_block_q: int | None = eqx.field(static=True, default=None)
    bwd_block_kv: int | None = eqx.field(static=True, default=None)
    bwd_num_warps: int | None = eqx.field(static=True, default=None)
    bwd_num_stages: int | None = eqx.field(static=True, default=None)
    f32_precision: str | None = eqx.field(static=True, default=None)
    compute_capability: str | None = eqx.field(static=True, default=None)
    interpret: bool = eqx.field(static=True, default=False)

    torch_names = {
        "BLOCK_M": "block_q",
        "BLOCK_N": "block_kv",
        "num_warps": "num_warps",
        "num_stages": "num_stages",
        "fwd_BLOCK_M": "block_q",
        "fwd_BLOCK_N": "block_kv",
        "fwd_num_warps": "num_warps",
        "fwd_num_stages": "num_stages",
        "BLOCK_M1": "bwd_block_q",
        "BLOCK_N1": "bwd_block_kv",
        "BLOCK_M2": "bwd_block_q",
        "BLOCK_N2": "bwd_block_kv",
        "bwd_BLOCK_M1": "bwd_block_q",
        "bwd_BLOCK_N1": "bwd_block_kv",
        "bwd_BLOCK_M2": "bwd_block_q",
        "bwd_BLOCK_N2": "bwd_block_kv",
        "bwd_num_warps": "bwd_num_warps",
        "bwd_num_stages": "bwd_num_stages",
    }

    def __check_init__(self):
        for key in ("block_q", "block_kv", "bwd_block_q", "bwd_block_kv"):
            value = getattr(self, key)
            if value is None:
                continue
            check_positive_int("triton", key, value)
            if value < 16 or value & (value - 1):
                raise ValueError(
                    f"triton backend: kernel_options[{key!r}] must be a power of two "
                    f"of at least 16, got {value!r}."
                )
        for key in ("num_warps", "bwd_num_warps"):
            value = getattr(self, key)
            if value is not None:
                check_positive_int("triton", key, value)
                if value & (value - 1):
                    raise ValueError(
                        f"triton backend: kernel_options[{key!r}] must be a power "
                        f"of two, got {value!r}."
                    )
        for key in ("num_stages", "bwd_num_stages"):
            if getattr(self, key) is not None:
                check_positive_int("triton", key, getattr(self, key))
        if self.f32_precision is not None and self.f32_precision not in F32_PRECISIONS:
            raise ValueError(
                "triton backend: kernel_options['f32_precision'] must be one of "
                f"{list(F32_PRECISIONS)}, got {self.f32_precision!r}."
            )
        if self.compute_capability is not None:
            if _parse_cc(self.compute_capability) is None:
                raise ValueError(
                    "triton backend: kernel_options['compute_capability'] must be "
                    f"like '8.0' or '8.9', got {self.compute_capability!r}."
                )
        check_bool("triton", "interpret", self.interpret)

    def overrides(self, kind: str) -> dict:
        if kind == "forward":
            names = ("block_q", "block_kv", "num_warps", "num_stages")
        else:
            names = ("bwd_block_q", "bwd_block_kv", "bwd_num_warps", "bwd_num_stages")
        keys = ("block_q", "block_kv", "num_warps", "num_stages")
        return {k: getattr(self, n) for k, n in zip(keys, names)}


def _parse_cc(cc) -> tuple[int, int] | None:
    try:
        major, minor = str(cc).split(".")
        return int(major), int(minor)
    except ValueError:
        return None


def compute_capability(cfg: TritonConfig) -> tuple[int, int] | None:
    """The target GPU's (major, minor), None when interpreting.

    **Raises:** `NotImplementedError` when JAX does not run on an NVIDIA GPU (and
    none was named by `compute_capability`), or on one older than Ampere.
    """
    if cfg.interpret:
        return None
    if cfg.compute_capability is not None:
        cc = _parse_cc(cfg.compute_capability)
    else:
        dev = jax.devices()[0]
        raw = getattr(dev, "compute_capability", None)
        if dev.platform != "gpu" or raw is None:
            raise NotImplementedError(
                f"it needs an NVIDIA GPU (sm80 or newer); JAX runs on {dev.platform}."
            )
        cc = _parse_cc(raw)
    if cc is None or cc < (8, 0):
        raise NotImplementedError(
            f"it needs an sm80 (Ampere) or newer GPU; this one is sm{cc}."
        )
    return cc


def f32_precision(cfg: TritonConfig) -> str:
    """How float32 matmuls run: the option, else JAX's default matmul precision."""
    if cfg.f32_precision is not None:
        return cfg.f32_precision
    value = jax.config.jax_default_matmul_precision
    return "ieee" if str(value).lower() in ("highest", "float32") else "tf32"


def _dot_precision(cfg: TritonConfig):
    if cfg.interpret:  # the CPU runs float32 matmuls in float32
        return lax.Precision.HIGHEST
    return {
        "tf32": lax.Precision.DEFAULT,
        "tf32x3": lax.DotAlgorithmPreset.TF32_TF32_F32_X3,
        "ieee": lax.Precision.HIGHEST,
    }[f32_precision(cfg)]


def _pad_to(x: Array, axis: int, size: int, value=0) -> Array:
    if x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths, constant_values=value)


def _lists(
    bm: BlockMask,
    static: _kernels.Static,
    tiles: _kernels.Tiles,
    transposed: bool = False,
):
    """`(counts (B|1, H|1, M, 2), blocks (B|1, H|1, M, N))` of `bm` (at `tiles`): per
    row its number of full blocks and of all blocks, then its blocks, full ones
    first; one row per program of the kernel's grid (`M` query tiles of `Lq_pad`,
    or key tiles of `Lkv_pad` if `transposed`). Rows past the mask's own (the
    lengths are padded to every kernel's tiles) have empty lists."""
    if transposed:
        rows = static.lkv_pad // tiles.block_kv
    else:
        rows = static.lq_pad // tiles.block_q
    (p_num, p_idx), (f_num, f_idx) = bm.block_lists(transposed=transposed)
    n = p_idx.shape[-1]
    j = jnp.arange(n, dtype=INDEX_DTYPE)
    full = f_num[..., None]
    partial = jnp.take_along_axis(p_idx, jnp.clip(j - full, 0, n - 1), axis=-1)
    blocks = jnp.where(j < full, f_idx, partial)
    counts = jnp.stack([f_num, f_num + p_num], axis=-1)
    counts, blocks = (_pad_to(x.astype(INDEX_DTYPE), 2, rows) for x in (counts, blocks))
    return counts, blocks


class _Plan(eqx.Module):
    """A problem's static sizes and tiles for each kernel."""

    static: _kernels.Static = eqx.field(static=True)
    fwd: _kernels.Tiles = eqx.field(static=True)
    bwd: _kernels.Tiles = eqx.field(static=True)


DIAG_TILE = 64  # the square backward tile of diagonal sums (`_reduce`'s layout)


def _plan(problem: AttentionProblem, cfg: TritonConfig, diag: bool = False) -> _Plan:
    """Sizes and tiles; with `diag`, backward tiles of `DIAG_TILE` squared (for the
    diagonal sums of relative-position table gradients).

    **Raises:** `NotImplementedError` when no tiles fit.
    """
    cc = compute_capability(cfg)
    b, hq, lq, d = problem.q.shape
    hkv, lkv, dv = problem.v.shape[1:]
    d_pad, dv_pad = _configs.pow2_at_least(d), _configs.pow2_at_least(dv)
    itemsize = jnp.dtype(problem.q.dtype).itemsize
    mask_block = problem.block_mask.block_size
    fwd, bwd = (
        _configs.choose(
            kind,
            cc,
            d_pad,
            dv_pad,
            itemsize,
            lq,
            lkv,
            mask_block,
            _square(cfg.overrides(kind))
            if diag and kind == "backward"
            else cfg.overrides(kind),
        )
        for kind in ("forward", "backward")
    )
    pad = lambda n, *sizes: math.lcm(*sizes) * math.ceil(n / math.lcm(*sizes))
    idx = problem.block_mask.kv_num_blocks
    static = _kernels.Static(
        b=b,
        hq=hq,
        hkv=hkv,
        lq=lq,
        lkv=lkv,
        lq_pad=pad(lq, fwd.block_q, bwd.block_q),
        lkv_pad=pad(lkv, fwd.block_kv, bwd.block_kv),
        d=d_pad,
        dv=dv_pad,
        scale=problem.scale,
        precision=_dot_precision(cfg),
        interpret=cfg.interpret,
        mask_batch=idx.shape[0] > 1,
        mask_head=idx.shape[1] > 1,
    )
    return _Plan(static, fwd, bwd)


def _square(override: dict) -> dict:
    square = dict(block_q=DIAG_TILE, block_kv=DIAG_TILE)
    for key, value in square.items():
        if override[key] not in (None, value):
            raise NotImplementedError(
                f"the diagonal sums need {DIAG_TILE}x{DIAG_TILE} backward tiles, "
                f"but kernel_options set {key}={override[key]}"
            )
    return override | square


def _visited(bm: BlockMask, static: _kernels.Static):
    """`(B|1, H|1, Lkv_pad / 64, Lq_pad / 64)`: the 64x64 tiles the dQ kernel
    computes (`bm` at those tiles)."""
    # Unchecked: the dQ kernel ran on these lists (and the checks' `eqx.error_if`
    # would not lower for the GPU off one).
    partial, full = bm._states(check=False)
    blocks = partial | full
    n = DIAG_TILE
    blocks = _pad_to(
        _pad_to(blocks, 2, static.lq_pad // n, False), 3, static.lkv_pad // n, False
    )
    return blocks.swapaxes(2, 3)


def _mask_at(problem: AttentionProblem, tiles: _kernels.Tiles) -> BlockMask:
    bm = problem.block_mask
    size = (tiles.block_q, tiles.block_kv)
    return bm if bm.block_size == size else bm.at_block_size(*size)


def _mods(problem: AttentionProblem, static: _kernels.Static):
    sizes = (static.b, static.hq, static.lq, static.lkv)
    pads = dict(lq_pad=static.lq_pad, lkv_pad=static.lkv_pad)
    score = None
    if problem.score_mod is not None:
        score = kernel_mod(problem.score_mod, *sizes, **pads)
    return score, kernel_mod(problem.mask_mod, *sizes, **pads)


def _padded(problem: AttentionProblem, static: _kernels.Static, *extra):
    """q, k, v (and `extra` arrays shaped like q's rows, e.g. dO) padded to the
    kernels' lengths and head dims with zeros."""
    q = _pad_to(_pad_to(problem.q, 2, static.lq_pad), 3, static.d)
    k = _pad_to(_pad_to(problem.k, 2, static.lkv_pad), 3, static.d)
    v = _pad_to(_pad_to(problem.v, 2, static.lkv_pad), 3, static.dv)
    extra = [_pad_to(_pad_to(x, 2, static.lq_pad), 3, static.dv) for x in extra]
    return q, k, v, *extra


class TritonBackend(AbstractBackend):
    """Pallas kernels lowered through Triton (NVIDIA sm80 and newer): see `_kernels`.

    Options: [`TritonConfig`][] (`kernel_options={"triton": {"num_stages": 2}}`).
    """

    name = "triton"
    config_class = TritonConfig
    interpretable = True
    runs_per_shard = True

    def check(self, problem: AttentionProblem) -> None:
        cfg = self.config(problem)
        dtype = problem.q.dtype
        if dtype not in DTYPES:
            raise NotImplementedError(
                f"it takes float16, bfloat16 or float32 inputs, got {dtype}."
            )
        d, dv = problem.q.shape[-1], problem.v.shape[-1]
        if max(d, dv) > 256:
            raise NotImplementedError(
                f"it takes head dims up to 256, got D={d}, Dv={dv}."
            )
        for mod in (problem.score_mod, problem.mask_mod):
            if mod is not None:
                kernel_mod_specs(mod)  # raises for a mod the kernels can't take
        _plan(problem, cfg)  # raises when no tiles fit the GPU

    def forward(self, problem: AttentionProblem) -> tuple[Array, Array]:
        plan = _plan(problem, self.config(problem))
        static = plan.static
        counts, blocks = _lists(_mask_at(problem, plan.fwd), static, plan.fwd)
        score, mask = _mods(problem, static)
        q, k, v = _padded(problem, static)
        out, lse = _kernels.forward(
            static, plan.fwd, q, k, v, counts, blocks, score, mask
        )
        lq, dv = problem.q.shape[2], problem.v.shape[3]
        return out[:, :, :lq, :dv], lse[:, :, :lq]

    def backward(self, problem, out, lse, dout, dlse, perturbed) -> Any:
        need_mod = perturbed.score_mod is not None and any(
            jax.tree_util.tree_leaves(perturbed.score_mod)
        )
        rows = cols = diag = ()  # float tables by how the kernels sum them
        if need_mod:
            specs = kernel_mod_specs(problem.score_mod)
            floats = [
                i for i, s in enumerate(specs) if jnp.issubdtype(s.dtype, jnp.floating)
            ]
            rows = tuple(i for i in floats if specs[i].kind in ("scalar", "q"))
            cols = tuple(i for i in floats if specs[i].kind == "kv")
            diag = tuple(i for i in floats if specs[i].kind == "diag")
        try:
            plan = _plan(problem, self.config(problem), bool(diag))
        except NotImplementedError as e:
            logger.debug(
                "triton backward: the xla backward runs: for relative-position "
                "table gradients, %s",
                e,
            )
            return XlaBackend().backward(problem, out, lse, dout, dlse, perturbed)
        if dout is None:
            dout = jnp.zeros_like(out)
        static, tiles = plan.static, plan.bwd
        lq, d = problem.q.shape[2:]
        lkv, dv = problem.v.shape[2:]
        # delta = rowsum(dO * O) - dlse; lse in base 2, +inf where a row is fully
        # masked (its P is then 0) and on padded rows.
        finite = jnp.isfinite(lse)
        delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
        if dlse is not None:
            delta = delta - jnp.where(finite, dlse.astype(jnp.float32), 0.0)
        lse2 = jnp.where(finite, lse.astype(jnp.float32) * LOG2_E, jnp.inf)
        lse2 = _pad_to(lse2, 2, static.lq_pad, jnp.inf)
        delta = _pad_to(delta, 2, static.lq_pad)
        q, k, v, do = _padded(problem, static, dout)
        score, mask = _mods(problem, static)
        operands = (q, k, v, do, lse2, delta)
        bm = _mask_at(problem, tiles)
        partials = [None] * (len(score.specs) if score is not None else 0)
        dq = dk = dv_ = dmod = None
        if perturbed.q or rows or diag:
            counts, blocks = _lists(bm, static, tiles)
            dq, row_sums, diag_sums = _kernels.dq(
                static, tiles, *operands, counts, blocks, score, mask, rows, diag
            )
            dq = dq[:, :, :lq, :d] if perturbed.q else None
            for i, part in zip(rows, row_sums):
                partials[i] = part
            if diag:
                visited = _visited(bm, static)
            for i, part in zip(diag, diag_sums):
                partials[i] = diagonal_partials(
                    part, visited, static.lq_pad, score.specs[i]
                )
        if perturbed.k or perturbed.v or cols:
            counts, blocks = _lists(bm, static, tiles, transposed=True)
            dk, dv_, col_sums = _kernels.dkv(
                static, tiles, *operands, counts, blocks, score, mask, cols
            )
            dk = dk[:, :, :lkv, :d] if perturbed.k else None
            dv_ = dv_[:, :, :lkv, :dv] if perturbed.v else None
            for i, part in zip(cols, col_sums):
                partials[i] = part
        if need_mod:
            grads = reduce_table_grads(partials, score.specs, score.tables)
            build = lambda m: kernel_mod(
                m,
                static.b,
                static.hq,
                lq,
                lkv,
                lq_pad=static.lq_pad,
                lkv_pad=static.lkv_pad,
            )
            dmod = table_vjp(build, problem.score_mod, grads)
        return grads_like(problem, dq, dk, dv_, dmod)


__all__ = ["DEVICE_KINDS", "TritonBackend", "TritonConfig"]
