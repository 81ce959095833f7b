"""Do the `triton` backend's kernels, at the tiles `_configs.py` chooses, compile for
sm80 (A100), sm86 (RTX 3090 / A10), sm89 (RTX 4090 / L4) and sm90 (H100) within each
card's shared memory and registers? Checked on a CPU-only host, no GPU needed.

1. **lower** (jax): `flex_attention` with learnt ALiBi slopes and a causal BlockMask
   (B=1, H=2, L=512), forward + gradient (q, k, v, slopes) at D = 64 and 128 and the
   forward alone at D = 256, in bfloat16 and float32, lowered for each card on an
   abstract GPU (`AbstractDevice(device_kind=...)`, `lowering_platforms=("cuda",)`)
   with `compute_capability` set, so `_configs.choose` picks that card's tiles. The
   Triton IR (TTIR) of each `pallas_call` (`flex_fwd`, `flex_bwd_dq`,
   `flex_bwd_dkv`) and its `num_warps` / `num_stages` are captured from Pallas's
   Triton lowering and written as text `.ttir` files.
2. **compile** (the `triton` package, in a subprocess: it is not imported next to
   jaxlib): `triton.compile(ttir, target=GPUTarget("cuda", cc, 32))` to PTX and cubin
   with the bundled ptxas; registers and stack frame from `cuobjdump -res-usage`
   on the cubin, spill bytes from ptxas's `-v` log, shared memory from the
   kernel's metadata (Triton's dynamic shared memory; plus any static shared
   memory) against the card's opt-in limit per block. The pip compile does not
   check that limit itself (Triton does so when it loads a kernel on a GPU).

On a GPU, XLA compiles the same TTIR with the Triton built into jaxlib (another
version, its own passes), so the usage there may differ somewhat from these numbers.

One line per (card, kernel, D, dtype): tiles (block_q x block_kv / warps / stages),
`_configs`' own shared-memory and register estimates, compiled or the first error
line, shared memory used vs the limit (`FITS` / `OVER`), registers and spill bytes.

Needs the `triton` package (not a project dependency) next to jax 0.11.2, e.g. in a
scratch venv:

    python3.12 -m venv /tmp/venv-triton
    /tmp/venv-triton/bin/pip install triton jax==0.11.2 jaxlib==0.11.2 \
        equinox jaxtyping beartype
    PYTHONPATH=. /tmp/venv-triton/bin/python -m benchmarks.triton_fit \
        [--cards sm80,sm89] [--keep DIR]

About 80 s in all on one CPU core (24 lowerings, 56 compiles of 1-2 s each).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings


# (name, device kind for the abstract GPU, compute capability, shared memory a block
# may opt in to (bytes), as CUDA documents it: cudaDevAttrMaxSharedMemoryPerBlockOptin)
CARDS = {
    "sm80": ("NVIDIA A100-SXM4-80GB", (8, 0), 163 * 1024),
    # sm86 as the A10 (same compute capability and shared memory as the RTX 3090,
    # which jax's device table lacks)
    "sm86": ("NVIDIA A10", (8, 6), 99 * 1024),
    "sm89": ("NVIDIA L4", (8, 9), 99 * 1024),
    "sm90": ("NVIDIA H100 80GB HBM3", (9, 0), 227 * 1024),
}
KERNELS = {"flex_fwd": "fwd", "flex_bwd_dq": "dq", "flex_bwd_dkv": "dkv"}
B, H, L = 1, 2, 512


# --------------------------------------------------------------------------- lower


def _capture():
    """Patch Pallas's Triton lowering to record each kernel's TTIR text and its
    num_warps / num_stages; returns the list it appends to."""
    from jax._src.interpreters import mlir
    from jax._src.pallas.triton import lowering, pallas_call_registration as reg

    seen: list[dict] = []
    lower_module = lowering.lower_jaxpr_to_triton_module
    custom_call = mlir.custom_call

    def lower_and_keep(*args, **kwargs):
        result = lower_module(*args, **kwargs)
        seen.append({"ttir": result.module.operation.get_asm(enable_debug_info=False)})
        return result

    def call_and_keep(call_target_name, *args, backend_config=None, **kwargs):
        if call_target_name == "__gpu$xla.gpu.triton" and seen:
            cfg = backend_config
            seen[-1]["name"] = str(cfg["name"]).strip('"')
            for key in ("num_warps", "num_stages"):
                seen[-1][key] = int(str(cfg[key]).split(":")[0])
        return custom_call(
            call_target_name, *args, backend_config=backend_config, **kwargs
        )

    lowering.lower_jaxpr_to_triton_module = lower_and_keep
    reg.mlir.custom_call = call_and_keep
    return seen


def lower_all(cards, out_dir: str) -> list[dict]:
    import jax
    import jax.numpy as jnp
    from jax.sharding import AbstractDevice, AbstractMesh

    import eqx_flexattn as fa
    from eqx_flexattn import masks, score_mods
    from eqx_flexattn._backends.triton import _configs

    seen = _capture()
    bm = fa.create_block_mask(masks.causal_mask, B, None, L, L)
    alibi = score_mods.Alibi(score_mods.alibi_slopes(H))
    jobs = []
    for card in cards:
        kind, cc, _ = CARDS[card]
        options = {"triton": {"compute_capability": "{}.{}".format(*cc)}}
        mesh = AbstractMesh(
            (1,),
            ("x",),
            abstract_device=AbstractDevice(
                device_kind=kind, num_cores=None, platform="gpu"
            ),
        )
        for dtype in (jnp.bfloat16, jnp.float32):
            for d in (64, 128, 256):

                def attend(q, k, v, mod):
                    return fa.flex_attention(
                        q, k, v, mod, bm, backend="triton", kernel_options=options
                    )

                def loss(q, k, v, mod):
                    return jnp.sum(attend(q, k, v, mod).astype(jnp.float32) ** 2)

                # D=256: the forward only (the backward candidates are for D <= 128)
                grad = jax.grad(loss, argnums=(0, 1, 2, 3))
                f = jax.jit(attend if d == 256 else grad)
                x = jax.ShapeDtypeStruct((B, H, L, d), dtype)
                f.trace(x, x, x, alibi)  # the mods' kernel forms, traced off the mesh
                start = len(seen)
                error = None
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", DeprecationWarning)
                        with jax.sharding.use_abstract_mesh(mesh):
                            f.trace(x, x, x, alibi).lower(lowering_platforms=("cuda",))
                except Exception as e:  # noqa: BLE001 - reported, not raised
                    error = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                itemsize = jnp.dtype(dtype).itemsize
                dt = jnp.dtype(dtype).name
                if error:
                    jobs.append(
                        dict(card=card, kernel="lower", d=d, dtype=dt, error=error)
                    )
                for i, k in enumerate(seen[start:]):
                    name = KERNELS.get(k.get("name"), k.get("name"))
                    path = os.path.join(out_dir, f"{card}_{name}_d{d}_{dt}_{i}.ttir")
                    with open(path, "w") as fh:
                        fh.write(k["ttir"])
                    est_kind = {"fwd": "forward"}.get(name, name)
                    tiles = _tiles_of(k["ttir"])
                    if tiles is not None and name == "dkv":  # its scores are S^T
                        tiles = tiles[::-1]
                    est = {}
                    if tiles is not None and est_kind in ("forward", "dq", "dkv"):
                        t = _configs.Tiles(*tiles, k["num_warps"], k["num_stages"])
                        est = dict(
                            est_smem=_configs.shared_bytes(est_kind, t, d, d, itemsize),
                            est_regs=_configs.registers_per_thread(est_kind, t, d, d),
                            limit_cfg=_configs.SHARED_MEMORY.get(cc),
                        )
                    jobs.append(
                        dict(
                            card=card,
                            cc=cc,
                            kernel=name,
                            d=d,
                            dtype=dt,
                            path=path,
                            tiles=tiles,
                            num_warps=k["num_warps"],
                            num_stages=k["num_stages"],
                            **est,
                        )
                    )
                print(
                    f"lowered {card} D={d} {dt}: {len(seen) - start} kernels"
                    + (f" ({error})" if error else ""),
                    file=sys.stderr,
                    flush=True,
                )
    return jobs


def _tiles_of(ttir: str):
    """(block_q, block_kv) of a kernel: the shape of its first 2-D float dot result
    (the score tile: block_q x block_kv in the forward and dQ kernels, block_kv x
    block_q in the dK/dV kernel, which computes S^T)."""
    m = re.search(r"tt\.dot .*-> tensor<(\d+)x(\d+)xf32", ttir)
    if not m:
        return None
    return int(m.group(1)), int(m.group(2))


# --------------------------------------------------------------------------- compile


def compile_all(jobs: list[dict]) -> list[dict]:
    """Compile each job's TTIR for its card with the `triton` package."""
    import contextlib
    import io

    import triton
    from triton.backends.compiler import GPUTarget

    triton.knobs.nvidia.dump_ptxas_log = True  # printed: `ptxas -v`'s usage lines

    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    cuobjdump = os.path.join(bindir, "cuobjdump")
    for job in jobs:
        if "path" not in job:
            continue
        major, minor = job["cc"]
        start = time.perf_counter()
        log = io.StringIO()
        try:
            with contextlib.redirect_stdout(log):
                k = triton.compile(
                    job["path"],
                    target=GPUTarget("cuda", 10 * major + minor, 32),
                    options={
                        "num_warps": job["num_warps"],
                        "num_stages": job["num_stages"],
                    },
                )
            m = re.search(
                r"(\d+) bytes spill stores, (\d+) bytes spill loads", log.getvalue()
            )
            spills = map(int, m.groups()) if m else (None, None)
            job["spill_stores"], job["spill_loads"] = spills
            job["shared"] = int(k.metadata.shared)
            ptx = k.asm["ptx"]
            job["mma"] = sorted(
                f for f in ("mma.sync", "wgmma", "ldmatrix", "cp.async") if f in ptx
            )
            with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
                fh.write(k.asm["cubin"])
                fh.flush()
                res = subprocess.run(
                    [cuobjdump, "-res-usage", fh.name], capture_output=True, text=True
                ).stdout
            for key, field in (
                ("regs", "REG"),
                ("stack", "STACK"),
                ("local", "LOCAL"),
                ("static_shared", "SHARED"),
            ):
                m = re.search(rf"\b{field}:(\d+)", res)
                job[key] = int(m.group(1)) if m else None
        except Exception as e:  # noqa: BLE001 - reported, not raised
            lines = [x for x in str(e).splitlines() if x.strip()]
            first = next(
                (x for x in lines if "error" in x.lower()), lines[0] if lines else ""
            )
            job["error"] = f"{type(e).__name__}: {first.strip()[:300]}"
        job["seconds"] = round(time.perf_counter() - start, 1)
        print(
            f"compiled {job['card']} {job['kernel']} D={job['d']} {job['dtype']}"
            f" in {job['seconds']} s" + (" ERROR" if "error" in job else ""),
            file=sys.stderr,
            flush=True,
        )
    return jobs


# --------------------------------------------------------------------------- report


def report(jobs: list[dict]) -> str:
    head = (
        "| card | kernel | D | dtype | tiles (q x kv / warps / stages) | estimate "
        "(smem KiB / regs) | compiled | shared KiB (limit) | fits | regs | spill "
        "stores/loads B (stack B) |"
    )
    rows = [head, "|" + "---|" * 11]
    for j in jobs:
        if "path" not in j:
            rows.append(
                f"| {j['card']} | {j['kernel']} | {j['d']} | {j['dtype']} | "
                f"| | {j['error']} | | | | |"
            )
            continue
        limit = CARDS[j["card"]][2]
        t = j["tiles"]
        tiles = f"{t[0]}x{t[1]}" if t else "?"
        tiles += f" / {j['num_warps']} / {j['num_stages']}"
        est = f"{j['est_smem'] / 1024:.0f} / {j['est_regs']}" if "est_smem" in j else ""
        if "error" in j:
            rows.append(
                f"| {j['card']} | {j['kernel']} | {j['d']} | {j['dtype']} | "
                f"{tiles} | {est} | FAIL: {j['error']} | | | | |"
            )
            continue
        smem = j["shared"] + (j.get("static_shared") or 0)
        fits = "FITS" if smem <= limit else "OVER"
        spill = f"{j.get('spill_stores')}/{j.get('spill_loads')} ({j.get('stack')})"
        rows.append(
            f"| {j['card']} | {j['kernel']} | {j['d']} | {j['dtype']} | {tiles} | "
            f"{est} | ok ({', '.join(j['mma'])}) | "
            f"{smem / 1024:.1f} ({limit // 1024}) | "
            f"{fits} | {j['regs']} | {spill} |"
        )
    return "\n".join(rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cards", default=",".join(CARDS), help="e.g. sm80,sm89")
    p.add_argument("--keep", help="write the .ttir files and jobs.json here")
    p.add_argument("--compile-jobs", help=argparse.SUPPRESS)  # the subprocess step
    args = p.parse_args(argv)
    if args.compile_jobs:
        with open(args.compile_jobs) as fh:
            jobs = compile_all(json.load(fh))
        with open(args.compile_jobs, "w") as fh:
            json.dump(jobs, fh)
        return
    cards = [c.strip() for c in args.cards.split(",") if c.strip()]
    out_dir = args.keep or tempfile.mkdtemp(prefix="triton_fit_")
    os.makedirs(out_dir, exist_ok=True)
    jobs = lower_all(cards, out_dir)
    path = os.path.join(out_dir, "jobs.json")
    with open(path, "w") as fh:
        json.dump(jobs, fh)
    env = dict(os.environ, TRITON_CACHE_DIR=os.path.join(out_dir, "cache"))
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, unwarned
    subprocess.run(
        [sys.executable, "-m", "benchmarks.triton_fit", "--compile-jobs", path],
        check=True,
        env=env,
    )
    with open(path) as fh:
        jobs = json.load(fh)
    from importlib.metadata import version

    versions = ", ".join(f"{p} {version(p)}" for p in ("jax", "jaxlib", "triton"))
    print(f"{versions}; B={B}, H={H}, L={L}, ALiBi + causal")
    print(report(jobs))


if __name__ == "__main__":
    main()
