"""The cost of summing a table's gradient onto its parameters (one GPU run).

    python -m benchmarks.reduce_cost

A "diag" table at L=8192 (B=4, H=16: `H x (2 L - 1)` entries, float32) is summed
onto the parameters it reads, three ways, for a relative-position table of
`2 L - 1` distances (unclipped: each entry its own element), a clipped one (256
distances: the ends shared by thousands of entries) and T5's 32 buckets:

- `segment_sum`: `_backends._reduce.segment_sum` (stable sort + segmented scan;
  bitwise reproducible, what `table_vjp` runs);
- `scatter_add`: `jax.ops.segment_sum` (a scatter-add: unordered atomics on GPUs);
- `one_hot`: a one-hot matrix product (reproducible; O(entries x parameters)
  memory, so only where that stays under 2**28 elements).

Prints median ms per (table, method) and whether two runs gave the same bits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.timing import measure, TimingSettings
from eqx_flexattn._backends._reduce import segment_sum


L, H = 8192, 16


def _segments(num_params: int, kind: str) -> np.ndarray:
    """Per table entry (head, diagonal), the parameter element it reads."""
    d = np.arange(2 * L - 1) - (L - 1)  # kv_idx - q_idx
    if kind == "unclipped":
        col = d + L - 1
    elif kind == "clipped":
        half = (num_params - 1) // 2
        col = np.clip(d, -half, half) + half
    else:  # T5-like: logarithmic buckets of |d|, signed
        a = np.abs(d)
        exact = num_params // 4
        big = exact + (
            np.log(np.maximum(a, 1) / exact) / np.log(128 / exact) * exact
        ).astype(np.int64)
        col = np.where(a < exact, a, np.minimum(big, 2 * exact - 1))
        col = col + np.where(d > 0, 2 * exact, 0)
    return (np.arange(H)[:, None] * num_params + col[None]).ravel().astype(np.int32)


def main() -> None:
    settings = TimingSettings(warmup=2, iters=20, timed_seconds=1.0)
    print(jax.devices()[0].device_kind, flush=True)
    rng = np.random.default_rng(0)
    for kind, per_head in (("unclipped", 2 * L - 1), ("clipped", 257), ("t5", 32)):
        num = H * per_head
        seg = jnp.asarray(_segments(per_head, kind))
        val = jnp.asarray(rng.normal(size=seg.shape).astype(np.float32))
        methods = {
            "segment_sum": jax.jit(lambda v, s: segment_sum(v, s, num)),
            "scatter_add": jax.jit(lambda v, s: jax.ops.segment_sum(v, s, num)),
        }
        if seg.size * num <= 2**28:
            methods["one_hot"] = jax.jit(
                lambda v, s: v @ jax.nn.one_hot(s, num, dtype=v.dtype)
            )
        want = np.zeros(num)
        np.add.at(want, np.asarray(seg), np.asarray(val, np.float64))
        for name, fn in methods.items():
            out = fn(val, seg)
            t = measure(lambda: fn(val, seg), jax.block_until_ready, settings)
            same = bool(jnp.all(fn(val, seg) == out))
            err = float(np.abs(np.asarray(out, np.float64) - want).max())
            print(
                f"{kind:10s} params={num:7d} entries={seg.size:7d} {name:12s} "
                f"{t.median_ms:8.3f} ms  same_bits={same}  max_err={err:.1e}",
                flush=True,
            )


if __name__ == "__main__":
    main()
