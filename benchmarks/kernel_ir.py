"""Fingerprints of the Mosaic GPU modules the `mosaic` kernels lower to (no GPU).

    python -m benchmarks.kernel_ir [--save DIR]

Lowers forward + backward (`jax.grad` through the forward, dQ and dK/dV kernels)
for the GPU on this machine, for a few mod and mask sets, and prints one line per
kernel: the SHA-256 of its Mosaic GPU module as MLIR text without debug
information. Equal fingerprints before and after a change mean the GPU runs the same
kernels: a refactor of the kernel code can be checked without device time. Compare
runs of the same script (a module's text also depends on what was lowered before it
in the process). `--save` writes the modules' text there, for a diff.

It reads each module from jax's private Mosaic GPU lowering entry point
(`lower_unpipelined_jaxpr_to_module`, jax 0.11); on another version that may move.
"""

from __future__ import annotations

import argparse
import hashlib
import pathlib
import re

import equinox as eqx
import jax
import jax.numpy as jnp
from jax._src.pallas.mosaic_gpu import lowering

import eqx_flexattn as fa
from eqx_flexattn import masks, score_mods
from eqx_flexattn._backends import BACKENDS


# name: (mask mod, score mod, Lq, Lkv, Hkv[, options]) with Hq = 2; the options
# (all optional): "d" (head dim, default 128), "dtype" (default bf16),
# "kernel_options" (default None).
CASES = {
    "alibi_causal": (
        masks.causal_mask,
        score_mods.Alibi(jnp.linspace(0.1, 0.9, 2, dtype=jnp.float32)),
        1024,
        1024,
        2,
    ),
    "softcap_sliding_ragged_gqa": (
        masks.sliding_window(200),
        score_mods.SoftCap(30.0),
        1000,
        1100,
        1,
    ),
    "prefix_lm_no_score_mod": (masks.prefix_lm(300), None, 1000, 1000, 2),
    "relative_bias_causal": (
        masks.causal_mask,
        score_mods.RelativePositionBias(2, 256, key=jax.random.key(0)),
        1024,
        1024,
        2,
    ),
    "alibi_causal_persistent": (
        masks.causal_mask,
        score_mods.Alibi(jnp.linspace(0.1, 0.9, 2, dtype=jnp.float32)),
        1024,
        1024,
        2,
        {"kernel_options": {"mosaic": {"persistent": True}}},
    ),
    "softcap_causal_d64_fp16": (
        masks.causal_mask,
        score_mods.SoftCap(30.0),
        512,
        512,
        2,
        {"d": 64, "dtype": jnp.float16, "kernel_options": {"num_stages": 3}},
    ),
    # The backward of D=256 is the xla backend's: one kernel, the forward.
    "causal_d256": (masks.causal_mask, None, 512, 512, 2, {"d": 256}),
}


def _modules(case) -> list[str]:
    """The Mosaic GPU modules (text) of one case's forward and backward."""
    mask_mod, score_mod, lq, lkv, hkv, *extra = case
    options = extra[0] if extra else {}
    d = options.get("d", 128)
    dtype = options.get("dtype", jnp.bfloat16)
    kernel_options = options.get("kernel_options")
    backend = BACKENDS["mosaic"]
    texts = []
    lower = lowering.lower_unpipelined_jaxpr_to_module

    def recording(*args, **kwargs):
        result = lower(*args, **kwargs)
        text = result.module.operation.get_asm(enable_debug_info=False)
        texts.append(re.sub(r"loc\([^)]*\)", "", text))
        return result

    def grads(q, k, v):
        bm = fa.create_block_mask(mask_mod, None, None, lq, lkv)

        def loss(q, k, v, mod):
            gqa = hkv != q.shape[1]
            problem = fa._attention._problem(
                q, k, v, mod, bm, None, gqa, kernel_options
            )
            out, _ = fa._attention._fused(problem, backend)
            return jnp.sum(out.astype(jnp.float32))

        return eqx.filter_grad(lambda a: loss(*a))((q, k, v, score_mod))

    q = jax.ShapeDtypeStruct((1, 2, lq, d), dtype)
    k = jax.ShapeDtypeStruct((1, hkv, lkv, d), dtype)
    lowering.lower_unpipelined_jaxpr_to_module = recording
    try:
        jax.jit(grads).trace(q, k, k).lower(lowering_platforms=("cuda",))
    finally:
        lowering.lower_unpipelined_jaxpr_to_module = lower
    return texts


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--save", default=None, help="write the modules' text here")
    args = parser.parse_args()
    jax.config.update("jax_traceback_in_locations_limit", 0)
    for name, case in CASES.items():
        for i, text in enumerate(_modules(case)):
            digest = hashlib.sha256(text.encode()).hexdigest()[:16]
            print(f"{name:28s} kernel {i}  {digest}  {len(text)} chars", flush=True)
            if args.save:
                path = pathlib.Path(args.save)
                path.mkdir(parents=True, exist_ok=True)
                (path / f"{name}_{i}.mlir").write_text(text)


if __name__ == "__main__":
    main()
