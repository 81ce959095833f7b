"""eqx_flexattn quickstart: the flaxattention README example, at a CPU-friendly size.

Run: python examples/quickstart.py
"""

import equinox as eqx
import jax
import jax.numpy as jnp

import eqx_flexattn as fa
from eqx_flexattn.masks import causal_mask
from eqx_flexattn.score_mods import checkerboard, generate_alibi_bias


def main(batch_size=2, num_heads=4, seq_len_q=512, seq_len_kv=512, feature_size=64):
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    query = jax.random.normal(kq, (batch_size, num_heads, seq_len_q, feature_size))
    key = jax.random.normal(kk, (batch_size, num_heads, seq_len_kv, feature_size))
    value = jax.random.normal(kv, (batch_size, num_heads, seq_len_kv, feature_size))

    # A block-sparse causal mask: blocks above the diagonal are never computed.
    block_mask = fa.create_block_mask(causal_mask, None, None, seq_len_q, seq_len_kv)
    print(block_mask)

    # ALiBi as a score mod: an eqx.Module whose slopes are learnable data.
    alibi = generate_alibi_bias(num_heads)

    # Compile it (the counterpart of torch.compile(flex_attention)): arrays are
    # traced, everything else is static. Called outside any jit, JAX would run it op
    # by op, 10x slower or more (flex_attention warns when that happens).
    attention = eqx.filter_jit(fa.flex_attention)
    output = attention(query, key, value, alibi, block_mask)
    print("output:", output.shape, output.dtype)
    reference = attention(query, key, value, alibi, block_mask, backend="reference")
    print("max |output - reference|:", float(jnp.max(jnp.abs(output - reference))))

    # Autograd through a checkerboard score mod, with the fused backward pass.
    def loss(query, key, value, backend="auto"):
        return fa.flex_attention(
            query, key, value, score_mod=checkerboard, backend=backend
        ).sum()

    grad_fn = eqx.filter_jit(jax.grad(loss, argnums=0))
    grad = grad_fn(query, key, value)
    print("grad:", grad.shape, grad.dtype)
    grad_ref = grad_fn(query, key, value, backend="reference")
    print("max |grad - reference|:", float(jnp.max(jnp.abs(grad - grad_ref))))

    # Gradients reach the ALiBi slopes too.
    def alibi_loss(alibi):
        return jnp.sum(fa.flex_attention(query, key, value, alibi, block_mask) ** 2)

    print("d loss / d slopes:", eqx.filter_jit(jax.grad(alibi_loss))(alibi).slopes)
    print(fa.explain_backend(query, key, value))


if __name__ == "__main__":
    main()
