"""Correctness of the `mosaic` backend on the GPU, at real tile sizes.

Compares `backend="mosaic"` (bf16/f16 inputs) with the `xla` backend run in float32
on the same (upcast) inputs, for every mask and score mod the kernel takes, ragged
lengths, GQA, Dv != D and fully masked rows. Prints one line per case and a summary;
exits non-zero on a failure.

    python -m benchmarks.mosaic_check [--gradients-only] [--options JSON]
"""

from __future__ import annotations

import json
import sys
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import eqx_flexattn as fa
from eqx_flexattn import masks, score_mods


jax.config.update("jax_default_matmul_precision", "highest")


MATCH: list = []  # `--match a,b`: only the cases whose names contain one of these


def _skipped(name: str) -> bool:
    return bool(MATCH) and not any(m in name for m in MATCH)


def _forward_case(*args, **kwargs):
    if _skipped(args[0]):
        return None
    try:
        return _case(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 -- report every case
        print(f"FAIL {args[0]:28s} {type(e).__name__}: {str(e)[:300]}", flush=True)
        return False


def _case(
    name,
    b,
    hq,
    hkv,
    lq,
    lkv,
    d,
    dv,
    mask=None,
    score=None,
    dtype=jnp.bfloat16,
    tol=2e-2,
    seed=0,
    opts=None,
):
    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (b, hq, lq, d), jnp.float32).astype(dtype)
    k = jax.random.normal(keys[1], (b, hkv, lkv, d), jnp.float32).astype(dtype)
    v = jax.random.normal(keys[2], (b, hkv, lkv, dv), jnp.float32).astype(dtype)
    bm = None if mask is None else fa.create_block_mask(mask, None, None, lq, lkv)

    def run(q, k, v, backend, opts):
        return fa.flex_attention(
            q,
            k,
            v,
            score,
            bm,
            enable_gqa=hq != hkv,
            return_lse=True,
            backend=backend,
            kernel_options=opts,
        )

    t0 = time.perf_counter()
    opts = {**EXTRA_OPTIONS, **(opts or {})}
    out, lse = jax.jit(lambda q, k, v: run(q, k, v, "mosaic", opts))(q, k, v)
    out = np.asarray(out.astype(jnp.float32))
    lse = np.asarray(lse)
    up = lambda x: x.astype(jnp.float32)
    want, want_lse = jax.jit(lambda q, k, v: run(q, k, v, "xla", None))(
        up(q), up(k), up(v)
    )
    want, want_lse = np.asarray(want), np.asarray(want_lse)
    rel = np.linalg.norm(out - want) / max(np.linalg.norm(want), 1e-30)
    fin = np.isfinite(want_lse)
    lse_err = np.abs(np.where(fin, lse - want_lse, 0)).max() if fin.any() else 0.0
    ok = (
        rel < tol
        and lse_err < 1e-2
        and not np.isnan(out).any()
        and np.array_equal(np.isfinite(lse), fin)
        and np.all(out[~np.broadcast_to(fin[..., None], out.shape)] == 0)
    )
    print(
        f"{'ok  ' if ok else 'FAIL'} {name:28s} rel={rel:.2e} lse_err={lse_err:.2e} "
        f"({time.perf_counter() - t0:.1f}s)",
        flush=True,
    )
    return ok


def grad_case(
    name, b, hq, hkv, lq, lkv, d, mask=None, score=None, dtype=jnp.bfloat16, tol=2e-2
):
    """Gradients of q, k, v and the score mod's arrays: mosaic against xla-float32."""
    if _skipped(name):
        return None
    try:
        keys = jax.random.split(jax.random.key(1), 4)
        q = jax.random.normal(keys[0], (b, hq, lq, d), jnp.float32).astype(dtype)
        k = jax.random.normal(keys[1], (b, hkv, lkv, d), jnp.float32).astype(dtype)
        v = jax.random.normal(keys[2], (b, hkv, lkv, d), jnp.float32).astype(dtype)
        w = jax.random.normal(keys[3], (b, hq, lq, d), jnp.float32)
        bm = None if mask is None else fa.create_block_mask(mask, None, None, lq, lkv)

        def loss(q, k, v, mod, backend):
            out, lse = fa.flex_attention(
                q, k, v, mod, bm, enable_gqa=hq != hkv, return_lse=True, backend=backend
            )
            lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
            return jnp.sum(out.astype(jnp.float32) * w) + 0.1 * jnp.sum(lse**2)

        t0 = time.perf_counter()
        up = lambda x: x.astype(jnp.float32)
        if isinstance(score, eqx.Module):  # learnable: its arrays get gradients

            def grads(backend, *qkv):
                fn = jax.grad(lambda *a: loss(*a, backend), (0, 1, 2, 3))
                return jax.jit(fn)(*qkv, score)
        else:  # None, or a closure: constant

            def grads(backend, *qkv):
                fn = jax.grad(lambda *a: loss(*a, score, backend), (0, 1, 2))
                return jax.jit(fn)(*qkv)

        g = grads("mosaic", q, k, v)
        want = grads("xla", up(q), up(k), up(v))
        rels = []
        for a, r in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(want)):
            a, r = np.asarray(up(a)), np.asarray(r)
            rels.append(
                np.linalg.norm(a - r) / max(np.linalg.norm(r), 1e-30)
                if not np.isnan(a).any()
                else np.inf
            )
        ok = max(rels) < tol
        print(
            f"{'ok  ' if ok else 'FAIL'} grad {name:23s} "
            f"rel={[f'{x:.1e}' for x in rels]} "
            f"({time.perf_counter() - t0:.1f}s)",
            flush=True,
        )
        return ok
    except Exception as e:  # noqa: BLE001
        print(f"FAIL grad {name:23s} {type(e).__name__}: {str(e)[:300]}", flush=True)
        return False


EXTRA_OPTIONS: dict = {}  # `--options JSON`: mosaic options for every forward case


def main() -> int:
    """`--gradients-only` skips the forward cases; `--options '{"persistent": true}'`
    adds mosaic kernel options to every forward case; `--match a,b` runs the cases
    whose names contain `a` or `b`."""
    args = sys.argv[1:]
    if "--match" in args:
        MATCH.extend(args[args.index("--match") + 1].split(","))
    if "--options" in args:
        EXTRA_OPTIONS.update(json.loads(args[args.index("--options") + 1]))
    print(jax.devices()[0].device_kind, jax.__version__, EXTRA_OPTIONS, flush=True)
    case = _forward_case
    if "--gradients-only" in sys.argv[1:]:
        case = lambda *args, **kwargs: None  # noqa: E731
    L = 2048
    ids = jnp.asarray((np.arange(L) * 8 // L).astype(np.int32))
    alibi = score_mods.Alibi(jnp.linspace(0.05, 0.5, 4).astype(jnp.float32))
    table = jax.random.normal(jax.random.key(5), (4, 2 * L - 1), jnp.float32)
    relative = score_mods.RelativePositionBias(4, L, table=table)
    t5 = score_mods.T5RelativeBias(4, table=table[:, :32])
    results = [
        case("none", 2, 4, 4, L, L, 128, 128),
        case("causal", 2, 4, 4, L, L, 128, 128, masks.causal_mask),
        case("alibi+causal", 2, 4, 4, L, L, 128, 128, masks.causal_mask, alibi),
        case(
            "softcap+causal",
            2,
            4,
            4,
            L,
            L,
            128,
            128,
            masks.causal_mask,
            score_mods.SoftCap(30.0),
        ),
        case("sliding_window", 2, 4, 4, L, L, 128, 128, masks.sliding_window(256)),
        case(
            "document",
            2,
            4,
            4,
            L,
            L,
            128,
            128,
            fa.and_masks(masks.causal_mask, masks.document_mask(ids)),
        ),
        case("prefix_lm", 2, 4, 4, L, L, 128, 128, masks.prefix_lm(512)),
        case("checkerboard", 2, 4, 4, L, L, 128, 128, None, score_mods.checkerboard),
        case(
            "relative_bias+causal", 2, 4, 4, L, L, 128, 128, masks.causal_mask, relative
        ),
        case(
            "t5 fp16 d64 sliding",
            2,
            4,
            4,
            L,
            L,
            64,
            64,
            masks.sliding_window(256),
            t5,
            jnp.float16,
        ),
        case(
            "seed fp16 d64 causal",
            2,
            4,
            4,
            L,
            L,
            64,
            64,
            masks.causal_mask,
            dtype=jnp.float16,
        ),
        case("gqa 8/2 causal", 1, 8, 2, L, L, 128, 128, masks.causal_mask),
        case(
            "ragged 1000x1500",
            1,
            4,
            2,
            1000,
            1500,
            128,
            128,
            lambda b, h, q, kv: kv <= q + 500,
        ),
        case("dv 64 != d 128", 1, 4, 4, 512, 512, 128, 64, masks.causal_mask),
        case("d 96 (padded)", 1, 4, 4, 512, 512, 96, 96, masks.causal_mask),
        case("d 256", 1, 2, 2, 512, 512, 256, 256, masks.causal_mask),
        case(
            "masked rows",
            1,
            2,
            2,
            512,
            512,
            128,
            128,
            lambda b, h, q, kv: (q % 3 != 1) & (kv <= q),
        ),
        case(
            "3 stages d64",
            1,
            4,
            4,
            L,
            L,
            64,
            64,
            masks.causal_mask,
            opts={"num_stages": 3},
        ),
        case("decode lq=1", 2, 4, 4, 1, 4096, 128, 128),
        grad_case("causal", 2, 4, 4, L, L, 128, masks.causal_mask),
        grad_case(
            "relative bias constant",
            2,
            4,
            4,
            L,
            L,
            128,
            masks.causal_mask,
            lambda *a: relative(*a),
        ),
        grad_case("relative bias learnable", 1, 4, 4, L, L, 128, None, relative),
        grad_case(
            "t5 constant fp16 d64",
            1,
            4,
            2,
            L,
            L,
            64,
            masks.sliding_window(256),
            lambda *a: t5(*a),
            jnp.float16,
        ),
        grad_case("alibi learnable", 2, 4, 4, L, L, 128, masks.causal_mask, alibi),
        grad_case(
            "softcap", 2, 4, 4, L, L, 128, masks.causal_mask, score_mods.SoftCap(30.0)
        ),
        grad_case(
            "document",
            2,
            4,
            4,
            L,
            L,
            128,
            fa.and_masks(masks.causal_mask, masks.document_mask(ids)),
        ),
        grad_case("sliding", 2, 4, 4, L, L, 128, masks.sliding_window(256)),
        grad_case(
            "gqa 8/2 + head bias",
            1,
            8,
            2,
            L,
            L,
            128,
            masks.causal_mask,
            score_mods.HeadBias(jnp.linspace(-1, 1, 8).astype(jnp.float32)),
        ),
        grad_case(
            "ragged fp16 d64",
            1,
            4,
            2,
            1000,
            1500,
            64,
            lambda b, h, q, kv: kv <= q + 500,
            dtype=jnp.float16,
        ),
        grad_case("no mask", 1, 4, 4, 1024, 1024, 128),
    ]
    results = [r for r in results if r is not None]
    print(f"{sum(results)}/{len(results)} passed", flush=True)
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
