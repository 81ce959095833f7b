"""Long context on several devices: context parallelism with a ring of K/V chunks.

Runs on CPU with 8 simulated devices (set below, before jax starts); on a machine with
several GPUs it uses them instead.

    python examples/long_context.py
"""

import os


if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

import eqx_flexattn as fa  # noqa: E402
from eqx_flexattn import context_parallel as cp  # noqa: E402


def main():
    n = min(jax.device_count(), 4)  # devices on the sequence axis
    data = 2 if jax.device_count() >= 2 * n else 1
    mesh = Mesh(np.array(jax.devices()[: data * n]).reshape(data, n), ("data", "seq"))
    B, H, L, D = 2, 4, 1000, 32  # L need not divide by the devices: it is padded
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(kq, (B, H, L, D), jnp.float32)
    k = jax.random.normal(kk, (B, H, L, D), jnp.float32)
    v = jax.random.normal(kv, (B, H, L, D), jnp.float32)

    # The mask and score mod of the single-device call, in global positions.
    block_mask = fa.create_block_mask(
        fa.masks.causal_mask, None, None, L, L, block_size=64
    )
    alibi = fa.score_mods.generate_alibi_bias(H)

    @jax.jit
    def sharded(q, k, v, alibi):
        # Load-balanced causal layout: device i holds chunks i and 2n-1-i.
        qb, kb, vb = (cp.to_balanced(x, n, block_size=64) for x in (q, k, v))
        out = cp.flex_attention(
            qb, kb, vb, alibi, block_mask, mesh=mesh, axis_name="seq",
            batch_axis="data" if data > 1 else None, strategy="ring",
            layout="balanced",
        )  # fmt: skip
        return cp.from_balanced(out, n, L)

    @jax.jit
    def single(q, k, v, alibi):
        return fa.flex_attention(q, k, v, alibi, block_mask)

    out = sharded(q, k, v, alibi)
    want = single(q, k, v, alibi)
    errors = {"out": float(jnp.max(jnp.abs(out - want)))}
    print(f"mesh {dict(mesh.shape)}: max |ring - one device| = {errors['out']:.2e}")

    # Gradients, the ALiBi slopes' summed over devices, equal the single call's.
    loss = lambda f: lambda *a: jnp.sum(f(*a) ** 2)
    g = jax.jit(jax.grad(loss(sharded), argnums=3))(q, k, v, alibi)
    g1 = jax.jit(jax.grad(loss(single), argnums=3))(q, k, v, alibi)
    error = jnp.linalg.norm(g.slopes - g1.slopes) / jnp.linalg.norm(g1.slopes)
    errors["d_slopes"] = float(error)
    print(f"d slopes: relative difference {errors['d_slopes']:.2e}")

    # Partial results over disjoint key sets merge exactly (a KV cache in pages).
    @jax.jit
    def paged(q, k, v):
        half = L // 2
        o1, l1 = fa.flex_attention(q, k[:, :, :half], v[:, :, :half], return_lse=True)
        o2, l2 = fa.flex_attention(q, k[:, :, half:], v[:, :, half:], return_lse=True)
        return fa.merge_attention([o1, o2], [l1, l2])[0], fa.flex_attention(q, k, v)

    merged, full = paged(q, k, v)
    errors["merge"] = float(jnp.max(jnp.abs(merged - full)))
    print(f"merge_attention vs full: {errors['merge']:.2e}")
    return errors


if __name__ == "__main__":
    main()
