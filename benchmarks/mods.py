"""The mask and score mods of each `Case`, built for every framework from one spec.

- `eqx_mods`: eqx_flexattn's own mask/score mods (`masks`, `score_mods`), so the
  benchmark exercises the library's public API.
- `torch_mods`: the same functions written for `torch.nn.attention.flex_attention`;
  learnable parameters are captured tensors with `requires_grad`.
- `dense_bias`: ALiBi / relative-position bias as an explicit `(1, H, Lq, Lkv)` bias,
  for kernels that take a bias array (tokamax), computed from the learnable
  parameters inside the timed function.

Queries sit at absolute positions `q_idx + config.q_offset` (decoding); the
parameters (slopes, tables, document ids) are identical across frameworks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import numpy as np

from .spec import Case, Config, document_ids, SOFTCAP


def alibi_slopes(num_heads: int) -> np.ndarray:
    """Standard ALiBi slopes `2 ** (-8 (h + 1) / H)` (eqx_flexattn's default)."""
    return np.exp2(-8.0 * (np.arange(num_heads, dtype=np.float32) + 1) / num_heads)


def relative_table(num_heads: int, max_distance: int) -> np.ndarray:
    """A small random `(H, 2 max_distance - 1)` relative-position bias table."""
    rng = np.random.default_rng(0)
    shape = (num_heads, 2 * max_distance - 1)
    return (0.02 * rng.standard_normal(shape)).astype(np.float32)


# --------------------------------------------------------------------------- JAX


def eqx_mods(case: Case, config: Config) -> tuple[Callable | None, Callable | None]:
    """(score_mod, mask_mod) for eqx_flexattn; None where the case has none."""
    import jax.numpy as jnp

    import eqx_flexattn as fa

    masks = {
        None: lambda: None,
        "causal": lambda: fa.masks.causal_mask,
        "sliding_window": lambda: fa.masks.sliding_window(config.window),
        "document": lambda: fa.and_masks(
            fa.masks.causal_mask,
            fa.masks.document_mask(jnp.asarray(document_ids(config.Lkv))),
        ),
        "prefix_lm": lambda: fa.masks.prefix_lm(config.prefix),
    }
    scores = {
        None: lambda: None,
        "checkerboard": lambda: fa.score_mods.checkerboard,
        "alibi": lambda: fa.score_mods.Alibi(jnp.asarray(alibi_slopes(config.Hq))),
        "softcap": lambda: fa.score_mods.SoftCap(SOFTCAP),
        "relative_bias": lambda: fa.score_mods.RelativePositionBias(
            config.Hq,
            config.Lkv,
            table=jnp.asarray(relative_table(config.Hq, config.Lkv)),
        ),
    }
    score_mod, mask_mod = scores[case.score](), masks[case.mask]()
    if config.q_offset:
        shift = lambda mod: None if mod is None else ShiftQ(mod, config.q_offset)
        score_mod, mask_mod = shift(score_mod), shift(mask_mod)
    return score_mod, mask_mod


class ShiftQ(eqx.Module):
    """A score or mask mod called with the query's absolute position (decoding)."""

    mod: Callable
    offset: int = eqx.field(static=True)

    def __call__(self, *args):
        *head, q_idx, kv_idx = args
        return self.mod(*head, q_idx + self.offset, kv_idx)


def bias_params(case: Case, config: Config) -> Any:
    """The learnable parameter behind a dense bias (slopes or table), as a jnp array."""
    import jax.numpy as jnp

    if case.score == "alibi":
        return jnp.asarray(alibi_slopes(config.Hq))
    if case.score == "relative_bias":
        return jnp.asarray(relative_table(config.Hq, config.Lkv))
    return None


def dense_bias(case: Case, config: Config, param, dtype):
    """`(1, Hq, Lq, Lkv)` additive bias of an ALiBi / relative-bias case, or None."""
    import jax.numpy as jnp

    if param is None:
        return None
    q = jnp.arange(config.Lq, dtype=jnp.int32)[:, None] + config.q_offset
    rel = jnp.arange(config.Lkv, dtype=jnp.int32)[None, :] - q  # kv_idx - q_idx
    if case.score == "alibi":
        bias = param[:, None, None] * rel.astype(param.dtype)
    else:
        m = config.Lkv
        bias = param[:, jnp.clip(rel, 1 - m, m - 1) + m - 1]
    return bias[None].astype(dtype)


# ------------------------------------------------------------------------- torch


def torch_mods(
    case: Case, config: Config, device, requires_grad: bool
) -> tuple[Callable | None, Callable | None, list]:
    """(score_mod, mask_mod, learnable tensors) for torch FlexAttention; the list is
    empty unless `requires_grad`."""
    import torch

    off = config.q_offset
    params: list = []

    def param(array: np.ndarray):
        t = torch.tensor(array, device=device, requires_grad=requires_grad)
        if requires_grad:
            params.append(t)
        return t

    score_mod = mask_mod = None
    if case.score == "checkerboard":

        def score_mod(score, b, h, q_idx, kv_idx):
            d = (kv_idx - (q_idx + off)).abs()
            half = score * 0.5
            return torch.where(d % 2 == 0, half * 2.0, half)

    elif case.score == "alibi":
        slopes = param(alibi_slopes(config.Hq))

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + slopes[h] * (kv_idx - (q_idx + off))

    elif case.score == "softcap":

        def score_mod(score, b, h, q_idx, kv_idx):
            return SOFTCAP * torch.tanh(score / SOFTCAP)

    elif case.score == "relative_bias":
        m = config.Lkv
        table = param(relative_table(config.Hq, m))

        def score_mod(score, b, h, q_idx, kv_idx):
            r = torch.clamp(kv_idx - (q_idx + off), 1 - m, m - 1)
            return score + table[h, r + m - 1]

    if case.mask == "causal":

        def mask_mod(b, h, q_idx, kv_idx):
            return q_idx + off >= kv_idx

    elif case.mask == "sliding_window":
        w = config.window

        def mask_mod(b, h, q_idx, kv_idx):
            d = q_idx + off - kv_idx
            return (d >= 0) & (d <= w)

    elif case.mask == "document":
        ids = torch.tensor(document_ids(config.Lkv), device=device)

        def mask_mod(b, h, q_idx, kv_idx):
            q = q_idx + off
            return (ids[q] == ids[kv_idx]) & (q >= kv_idx)

    elif case.mask == "prefix_lm":
        n = config.prefix

        def mask_mod(b, h, q_idx, kv_idx):
            return (kv_idx < n) | (q_idx + off >= kv_idx)

    return score_mod, mask_mod, params
