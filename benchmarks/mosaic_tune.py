"""Forward time of the `mosaic` kernel under several tile/stage options (one GPU run).

    python -m benchmarks.mosaic_tune

Prints one line per (config, case, options): median ms and TFLOP/s on the attended
fraction, timed like the harness (`benchmarks.timing`).
"""

from __future__ import annotations

import jax

import eqx_flexattn as fa
from benchmarks import mods, spec
from benchmarks.timing import measure, TimingSettings


VARIANTS = {
    "seed": [
        {},
        {"num_stages": 3},
        {"block_kv": 64},
        {"block_kv": 256},
        {"block_kv": 64, "num_stages": 4},
    ],
    "L8k": [{}, {"block_kv": 64}, {"block_kv": 64, "num_stages": 3}],
}
CASES = ("none", "causal", "softcap+causal", "document")


def main() -> None:
    settings = TimingSettings(warmup=2, iters=20, timed_seconds=1.0)
    print(jax.devices()[0].device_kind, flush=True)
    for cname, variants in VARIANTS.items():
        config = spec.CONFIGS[cname]
        key = jax.random.key(0)
        shape = (config.B, config.Hq, config.Lq, config.D)
        ks = jax.random.split(key, 3)
        q = jax.random.normal(ks[0], shape, config.dtype)
        k = jax.random.normal(ks[1], shape, config.dtype)
        v = jax.random.normal(ks[2], shape, config.dtype)
        for case_name in CASES:
            case = spec.CASES[case_name]
            score_mod, mask_mod = mods.eqx_mods(case, config)
            bm = None
            if mask_mod is not None:
                bm = fa.create_block_mask(mask_mod, None, None, config.Lq, config.Lkv)
            flop = spec.flops(case, config)[0]
            for opts in variants:
                f = jax.jit(
                    lambda q, k, v, p, opts=opts: fa.flex_attention(
                        q,
                        k,
                        v,
                        p[0],
                        p[1],
                        backend="mosaic",
                        kernel_options={"mosaic": opts},
                    )
                )
                try:
                    t = measure(
                        lambda: f(q, k, v, (score_mod, bm)),
                        jax.block_until_ready,
                        settings,
                    )
                    print(
                        f"{cname:5s} {case_name:15s} {str(opts):38s} "
                        f"{t.median_ms:8.3f} ms "
                        f"{flop / t.median_ms / 1e9:6.0f} TFLOP/s",
                        flush=True,
                    )
                except Exception as e:  # noqa: BLE001
                    print(
                        f"{cname:5s} {case_name:15s} {str(opts):38s} FAIL "
                        f"{type(e).__name__}: {str(e)[:200]}",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
