"""Context parallelism and batch sharding on several GPUs of one host, against one GPU.

In one process on every visible GPU (2 for the issue's goal):

1. **check**: `context_parallel.flex_attention` (ring and all-gather, balanced causal
   layout) against the single-GPU call at a length one GPU holds: out, lse, dq, dk,
   dv and the gradients of ALiBi slopes and a relative-position table (bf16
   tolerance: relative norm error <= 2e-2).
2. **attention**: causal (balanced layout) and document-mask fwd+bwd at
   L = 131072 and 262144 (B=1, H=16, D=128, bf16), ring and all-gather, against one
   GPU at the same length when it fits (else the longest that fits, scaled by the
   quadratic cost); per-device temporary memory from XLA's memory analysis; the K/V
   transfer time of the ring (timed alone) and how much of it hides behind compute:
   `hidden = 1 - max(0, t_ring - t_1gpu / P) / t_transfers`.
3. **training step**: a small `MultiheadFlexAttention` model (data parallel:
   `shard_map` over the batch, gradients `pmean`-ed), one optimiser step on all GPUs
   against one.

Writes `distributed.json` and `distributed.md` to `--out`. `--tiny` runs tiny sizes
(on CPU: `XLA_FLAGS=--xla_force_host_platform_device_count=2`), a check of the script.

    python -m benchmarks.distributed --out "$OUT"
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import eqx_flexattn as fa
from eqx_flexattn import context_parallel as cp

from .timing import measure, TimingSettings


SETTINGS = TimingSettings(warmup=1, iters=3, timed_seconds=1.0)
SYNC = jax.block_until_ready


def _inputs(b, h, length, d, dtype=jnp.bfloat16, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    return tuple(
        jax.random.normal(x, (b, h, length, d), jnp.float32).astype(dtype) for x in ks
    )


def _mask(kind: str, length: int, block: int):
    if kind == "causal":
        mod = fa.masks.causal_mask
    else:  # documents of random lengths, about 16 of them, causal inside
        rng = np.random.default_rng(0)
        cuts = np.sort(rng.choice(np.arange(1, length), 15, replace=False))
        ids = jnp.asarray(np.searchsorted(cuts, np.arange(length), side="right"))
        mod = fa.and_masks(fa.masks.causal_mask, fa.masks.document_mask(ids))
    make = lambda: fa.create_block_mask(
        mod, None, None, length, length, block_size=block
    )
    return jax.jit(make)()


def _loss(attention):
    def loss(q, k, v, mod):
        out, lse = attention(q, k, v, mod)
        value = jnp.sum(out.astype(jnp.float32) ** 2) + 1e-3 * jnp.sum(
            jnp.where(jnp.isfinite(lse), lse, 0.0)
        )
        return value, (out, lse)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))


def _cp(mesh, bm, strategy, layout, devices):
    def attention(q, k, v, mod):
        length = q.shape[2]
        if layout == "balanced":
            q, k, v = (
                cp.to_balanced(x, devices, block_size=bm.block_size[0])
                for x in (q, k, v)
            )
        out, lse = cp.flex_attention(
            q,
            k,
            v,
            mod,
            bm,
            mesh=mesh,
            axis_name="seq",
            strategy=strategy,
            layout=layout,
            return_lse=True,
        )
        if layout == "balanced":
            out = cp.from_balanced(out, devices, length)
            lse = cp.from_balanced(lse, devices, length)
        return out, lse

    return attention


def _single(bm):
    return lambda q, k, v, mod: fa.flex_attention(q, k, v, mod, bm, return_lse=True)


def check(mesh, n, length, heads, dim, block) -> dict:
    q, k, v = _inputs(1, heads, length, dim)
    mod = fa.score_mods.compose(
        fa.score_mods.generate_alibi_bias(heads),
        fa.score_mods.RelativePositionBias(heads, 64, key=jax.random.key(3)),
    )
    bm = _mask("causal", length, block)
    (_, (out, lse)), grads = _loss(_single(bm))(q, k, v, mod)
    want = [out, lse, *jax.tree.leaves(grads)]
    names = ["out", "lse", "dq", "dk", "dv", "d_alibi_slopes", "d_relative_table"]
    report = {}
    for strategy in ("ring", "all_gather"):
        attention = _cp(mesh, bm, strategy, "balanced", n)
        (_, (out, lse)), grads = _loss(attention)(q, k, v, mod)
        got = [out, lse, *jax.tree.leaves(grads)]
        errors = {}
        for name, x, y in zip(names, got, want):
            x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
            finite = np.isfinite(y)
            err = np.linalg.norm(np.where(finite, x - y, 0)) / max(
                np.linalg.norm(np.where(finite, y, 0)), 1e-30
            )
            errors[name] = float(err)
        ok = all(e <= 2e-2 for e in errors.values())
        report[strategy] = dict(relative_error=errors, ok=ok)
        print(
            f"check {strategy:10s} ok={ok} "
            + " ".join(f"{k}={e:.1e}" for k, e in errors.items())
        )
    return report


def _compile(fn, args):
    """`fn` compiled for `args`, or None when it does not fit in memory."""
    try:
        return fn.lower(*args).compile()
    except Exception as e:  # noqa: BLE001 - out of memory is an answer here
        if _oom(e):
            return None
        raise


def _oom(e: Exception) -> bool:
    return "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower()


def _memory(compiled) -> float | None:
    """Per-device temporary memory (GiB) of a compiled program, from XLA."""
    try:
        return compiled.memory_analysis().temp_size_in_bytes / 2**30
    except Exception:  # noqa: BLE001 - not every platform reports it
        return None


def _time_or_oom(compiled, args) -> float | None:
    if compiled is None:
        return None
    try:
        return measure(lambda: compiled(*args), SYNC, SETTINGS).median_ms
    except Exception as e:  # noqa: BLE001 - out of memory is an answer here
        if _oom(e):
            return None
        raise


def _transfer_ms(mesh, n, length, heads, dim) -> float:
    """One ring step's K/V transfer timed alone: a `ppermute` of a K and a V chunk."""
    shape = (1, heads, length, dim)
    spec = NamedSharding(mesh, PartitionSpec(None, None, "seq"))
    kv = jax.device_put(jnp.zeros(shape, jnp.bfloat16), spec)
    perm = [(j, (j + 1) % n) for j in range(n)]
    send = jax.jit(
        jax.shard_map(
            lambda k, v: jax.lax.ppermute((k, v), "seq", perm),
            mesh=mesh,
            in_specs=(PartitionSpec(None, None, "seq"),) * 2,
            out_specs=(PartitionSpec(None, None, "seq"),) * 2,
        )
    )
    return measure(lambda: send(kv, kv), SYNC, SETTINGS).median_ms


def attention(mesh, n, lengths, heads, dim, block) -> list[dict]:
    rows = []
    single_fits: dict[str, tuple[int, float]] = {}
    for kind in ("causal", "documents"):
        for length in lengths:
            q, k, v = _inputs(1, heads, length, dim)
            bm = _mask(kind, length, block)
            args = (q, k, v, None)
            one = _compile(_loss(_single(bm)), args)
            t1 = _time_or_oom(one, args)
            if t1 is not None:
                single_fits[kind] = (length, t1)
            transfer = _transfer_ms(mesh, n, length, heads, dim) * (n - 1)
            layout = "balanced" if kind == "causal" else "natural"
            for strategy in ("ring", "all_gather"):
                fn = _compile(_loss(_cp(mesh, bm, strategy, layout, n)), args)
                tn = _time_or_oom(fn, args)
                ref_len, ref_t = single_fits.get(kind, (None, None))
                scaled = None if ref_t is None else ref_t * (length / ref_len) ** 2
                hidden = None
                if tn is not None and scaled is not None and strategy == "ring":
                    # fwd sends K/V (n-1 hops), bwd K/V and dK/dV: ~3x one pass.
                    exposed = max(0.0, tn - scaled / n)
                    hidden = max(0.0, 1.0 - exposed / (3 * transfer))
                row = dict(
                    mask=kind,
                    L=length,
                    strategy=strategy,
                    layout=layout,
                    gpus=n,
                    fwd_bwd_ms=tn,
                    one_gpu_ms=t1,
                    one_gpu_scaled_ms=scaled,
                    one_gpu_length=ref_len,
                    speedup=None if tn is None or scaled is None else scaled / tn,
                    kv_transfer_ms_per_pass=transfer,
                    transfers_hidden=hidden,
                    temp_gib_per_device=None if fn is None else _memory(fn),
                    temp_gib_one_gpu=None if one is None else _memory(one),
                )
                rows.append(row)
                print(
                    f"{kind:9s} L={length:7d} {strategy:10s} {n} GPUs "
                    f"{tn if tn is not None else float('nan'):9.1f} ms | 1 GPU "
                    f"{scaled if scaled is not None else float('nan'):9.1f} ms | "
                    f"speedup {row['speedup'] or float('nan'):.2f} | hidden "
                    f"{hidden if hidden is not None else float('nan'):.2f} | temp/dev "
                    f"{row['temp_gib_per_device'] or float('nan'):.2f} GiB (1 GPU "
                    f"{row['temp_gib_one_gpu'] or float('nan'):.2f})",
                    flush=True,
                )
    return rows


def training_step(mesh_batch, n, batch, length, width, heads) -> dict:
    """One optimiser step (SGD) of a 2-layer attention model; data parallel."""
    import optax

    keys = jax.random.split(jax.random.key(0), 3)
    model = [
        fa.nn.MultiheadFlexAttention(
            num_heads=heads, query_size=width, key=k, dtype=jnp.bfloat16
        )
        for k in keys[:2]
    ]
    bm = _mask("causal", length, 128)
    x = jax.random.normal(keys[2], (batch, length, width), jnp.bfloat16)
    opt = optax.sgd(1e-3)
    state = opt.init(eqx.filter(model, eqx.is_inexact_array))

    def loss(model, x):
        def one(x):
            for layer in model:
                x = x + layer(x, x, x, block_mask=bm)
            return jnp.mean(x.astype(jnp.float32) ** 2)

        return jnp.mean(jax.vmap(one)(x))

    def grads_of(model, x):
        return eqx.filter_value_and_grad(loss)(model, x)

    def step(model, state, x, sharded):
        if sharded:
            params, static = eqx.partition(model, eqx.is_array)
            rep = jax.tree.map(lambda _: PartitionSpec(), params)

            def local(params, x):
                value, g = grads_of(eqx.combine(params, static), x)
                return jax.lax.pmean((value, g), "data")

            value, g = jax.shard_map(
                local,
                mesh=mesh_batch,
                in_specs=(rep, PartitionSpec("data")),
                out_specs=(PartitionSpec(), rep),
                check_vma=False,  # the backends' loops are not typed for it
            )(params, x)
        else:
            value, g = grads_of(model, x)
        updates, state = opt.update(g, state)
        return eqx.apply_updates(model, updates), state, value

    result = {}
    for name, sharded in (("one_gpu", False), (f"{n}_gpus", True)):
        run = eqx.filter_jit(lambda m, s, x, sharded=sharded: step(m, s, x, sharded))
        xs = x
        if sharded:
            xs = jax.device_put(x, NamedSharding(mesh_batch, PartitionSpec("data")))
        result[name] = measure(lambda: run(model, state, xs), SYNC, SETTINGS).median_ms
    result["speedup"] = result["one_gpu"] / result[f"{n}_gpus"]
    result["shape"] = dict(batch=batch, L=length, width=width, heads=heads, layers=2)
    print(f"training step: {result}")
    return result


def _markdown(record) -> str:
    lines = [
        f"# Context parallelism on {record['gpus']} x {record['device']}",
        "",
        f"jax {record['jax']}; B=1, H={record['heads']}, D={record['dim']}, bf16, "
        "fwd+bwd. `1 GPU` is measured at the same L, or scaled from the longest L "
        "that fits (quadratic cost).",
        "",
        "| mask | L | strategy | ms | 1 GPU ms | speedup | transfers hidden | "
        "temp GiB/device (1 GPU) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    fmt = lambda x, f: "-" if x is None else format(x, f)
    for r in record["attention"]:
        cells = (
            r["mask"],
            r["L"],
            r["strategy"],
            fmt(r["fwd_bwd_ms"], ".1f"),
            fmt(r["one_gpu_scaled_ms"], ".1f"),
            fmt(r["speedup"], ".2f"),
            fmt(r["transfers_hidden"], ".2f"),
            f"{fmt(r['temp_gib_per_device'], '.2f')} "
            f"({fmt(r['temp_gib_one_gpu'], '.2f')})",
        )
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    t = record["training_step"]
    lines += [
        "",
        f"Training step (data parallel, {t['shape']}): one GPU "
        f"{t['one_gpu']:.1f} ms, {record['gpus']} GPUs "
        f"{t[str(record['gpus']) + '_gpus']:.1f} ms, speedup {t['speedup']:.2f}.",
        "",
        "Check against one GPU (relative norm error): "
        + "; ".join(
            f"{s}: ok={c['ok']}, max {max(c['relative_error'].values()):.1e}"
            for s, c in record["check"].items()
        ),
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (CPU check)")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args(argv)
    n = jax.device_count()
    if n < 2:
        print("needs 2 or more devices", file=sys.stderr)
        return 2
    if args.tiny:
        # One call in flight at a time: XLA's CPU collectives can miss their
        # rendezvous when many programs are queued on a busy machine.
        global SETTINGS
        SETTINGS = TimingSettings(warmup=1, iters=3, timed_seconds=0.5, max_calls=1)
        heads, dim, block, check_len = 2, 32, 32, 256
        lengths, train = [512, 1024], dict(batch=n, length=256, width=64, heads=2)
    else:
        heads, dim, block, check_len = 16, 128, 128, 8192
        lengths = [131072, 262144]
        train = dict(batch=4 * n, length=8192, width=1024, heads=16)
    mesh = Mesh(np.array(jax.devices()), ("seq",))
    mesh_batch = Mesh(np.array(jax.devices()), ("data",))
    start = time.time()
    record = dict(
        device=jax.devices()[0].device_kind,
        gpus=n,
        jax=jax.__version__,
        heads=heads,
        dim=dim,
        check=check(mesh, n, check_len, heads, dim, block),
    )
    record["attention"] = attention(mesh, n, lengths, heads, dim, block)
    record["training_step"] = training_step(mesh_batch, n, **train)
    record["seconds"] = time.time() - start
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "distributed.json"), "w") as f:
        json.dump(record, f, indent=1)
    with open(os.path.join(args.out, "distributed.md"), "w") as f:
        f.write(_markdown(record))
    print(_markdown(record))
    ok = all(c["ok"] for c in record["check"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
