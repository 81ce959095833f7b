"""The sharded call's wiring on one GPU: `context_parallel.flex_attention` on a mesh of
one device (inside `shard_map`) against the plain call, same backend, same inputs.

Prints, for each variant, the largest difference from the plain call (out, lse, dq,
dk, dv) and the median ms of the forward and forward+backward passes; writes the same
as JSON. Variants: `plain` (`fa.flex_attention`), `shard_map` (a mesh of one: the
per-device call, the same kernel), and with `--ring` the ring machinery on a ring of
one device (block-mask slicing, local mods, the ring's custom VJP).

    python -m benchmarks.shard_check [--length 4096] [--ring] [--out DIR]

On CPU (`--length 256`) it runs the `xla` backend: a check of the script itself.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

import eqx_flexattn as fa
from eqx_flexattn import context_parallel as cp

from .timing import measure, TimingSettings


NAMES = ("out", "lse", "dq", "dk", "dv")


def _variants(mesh, ring: bool, backend: str, options):
    kw = dict(return_lse=True, backend=backend, kernel_options=options)

    def plain(q, k, v, bm):
        return fa.flex_attention(q, k, v, None, bm, **kw)

    def sharded(q, k, v, bm):
        return cp.flex_attention(q, k, v, None, bm, mesh=mesh, axis_name="seq", **kw)

    def ring_of_one(q, k, v, bm):
        return cp.flex_attention(
            q, k, v, None, bm, mesh=mesh, axis_name="seq", strategy="ring", **kw
        )

    found = {"plain": plain, "shard_map": sharded}
    if ring:
        found["ring_of_one"] = ring_of_one
    return found


def _fwd_bwd(fn):
    def loss(q, k, v, bm):
        out, lse = fn(q, k, v, bm)
        return jnp.sum(out.astype(jnp.float32) ** 2) + 1e-3 * jnp.sum(lse), (out, lse)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--ring", action="store_true", help="also the ring of one")
    parser.add_argument("--backend", default="auto")
    parser.add_argument(
        "--interpret", action="store_true", help="Pallas kernels in interpret mode"
    )
    parser.add_argument(
        "--no-timing", action="store_true", help="agreement only (interpret mode)"
    )
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args(argv)
    b, h, length, d = args.batch, args.heads, args.length, args.dim
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("seq",))
    ks = jax.random.split(jax.random.key(0), 3)
    q, k, v = (
        jax.random.normal(x, (b, h, length, d), jnp.float32).astype(jnp.bfloat16)
        for x in ks
    )
    bm = jax.jit(
        lambda: fa.create_block_mask(fa.masks.causal_mask, None, None, length, length)
    )()
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}")
    options = {"interpret": True} if args.interpret else None
    print(fa.explain_backend(q, k, v, None, bm, kernel_options=options).splitlines()[0])
    settings = TimingSettings(warmup=3, iters=10, timed_seconds=1.0)
    sync = jax.block_until_ready
    results, base = {}, None
    nothing = type("Untimed", (), dict(median_ms=float("nan"), first_call_s=0.0))
    backend = args.backend
    if backend == "auto" and jax.devices()[0].platform == "gpu":
        backend = "mosaic"  # every variant on the kernel, or a decline said aloud
    timed = not args.no_timing
    for name, fn in _variants(mesh, args.ring, backend, options).items():
        fwd = jax.jit(fn)
        both = _fwd_bwd(fn)
        try:
            t_fwd = (
                measure(lambda: fwd(q, k, v, bm), sync, settings) if timed else nothing
            )
            t_both = (
                measure(lambda: both(q, k, v, bm), sync, settings) if timed else nothing
            )
            (_, (out, lse)), grads = both(q, k, v, bm)
        except NotImplementedError as e:
            print(f"{name:12s} declined: {e}")
            results[name] = dict(declined=str(e))
            continue
        values = [out, lse, *grads]
        if base is None:
            base = values
        diff = [
            float(jnp.max(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32))))
            for x, y in zip(values, base)
        ]
        results[name] = dict(
            fwd_ms=t_fwd.median_ms,
            fwd_bwd_ms=t_both.median_ms,
            compile_s=t_fwd.first_call_s + t_both.first_call_s,
            max_abs_diff=dict(zip(NAMES, diff)),
        )
        print(
            f"{name:12s} fwd {t_fwd.median_ms:8.3f} ms  fwd+bwd {t_both.median_ms:8.3f}"
            f" ms  max |diff| vs plain: "
            + " ".join(f"{n}={x:.2e}" for n, x in zip(NAMES, diff))
        )  # fmt: skip
    record = dict(
        device=jax.devices()[0].device_kind,
        jax=jax.__version__,
        backend=backend,
        shape=dict(B=b, H=h, L=length, D=d, dtype="bfloat16", mask="causal"),
        results=results,
    )
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "shard_check.json"), "w") as f:
        json.dump(record, f, indent=1)
    same = all(
        max(r["max_abs_diff"].values()) == 0.0 for n, r in results.items()
        if n == "shard_map" and "max_abs_diff" in r
    )  # fmt: skip
    print("shard_map bit-identical to plain:", same)
    return 0


if __name__ == "__main__":
    sys.exit(main())
