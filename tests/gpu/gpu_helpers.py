"""Pieces the GPU tests of every kernel backend share."""

import jax
import jax.numpy as jnp
import numpy as np

from eqx_flexattn import score_mods


class LearnableBiases(score_mods.Alibi):
    """ALiBi slopes, a per-query bias and a relative-position table, all learnable:
    one score mod with a table of every kind whose gradient a kernel reduces."""

    bias: jax.Array
    relative: score_mods.RelativePositionBias

    def __init__(self, heads: int, length: int):
        self.slopes = jnp.linspace(0.05, 0.5, heads).astype(jnp.float32)
        self.bias = jnp.linspace(-0.5, 0.5, length).astype(jnp.float32)
        table = jax.random.normal(
            jax.random.key(6), (heads, 2 * length - 1), jnp.float32
        )
        self.relative = score_mods.RelativePositionBias(heads, length, table=table)

    def __call__(self, s, b, h, q, kv):
        s = super().__call__(s, b, h, q, kv) + self.bias[q]
        return self.relative(s, b, h, q, kv)


def assert_bitwise_repeatable(fn, *args, runs: int = 5):
    """`fn(*args)` gives identical bits (every leaf) in each of `runs` calls."""
    results = [jax.tree_util.tree_leaves(fn(*args)) for _ in range(runs)]
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def assert_matches_torch_alibi_causal(ours, q, k, v, slopes, dout, dtype: str):
    """`ours(q, k, v, slopes) -> (out, lse)` (causal attention with ALiBi `slopes`)
    against `torch.nn.attention.flex_attention` on the same inputs in torch's
    `dtype`: outputs, lse and the gradients of q, k, v and the slopes for the output
    cotangent `dout`, each within 2% (relative norm)."""
    import torch
    from torch.nn.attention import flex_attention as tfa

    lq = q.shape[2]
    (out, lse), vjp = jax.vjp(ours, q, k, v, slopes)
    dout = dout.astype(out.dtype)
    dq, dk, dv, dslopes = vjp((dout, jnp.zeros_like(lse)))

    tdtype = getattr(torch, dtype)
    to_t = lambda x: torch.tensor(np.asarray(x.astype(jnp.float32)), device="cuda")
    tq, tk, tv = (to_t(x).to(tdtype).requires_grad_() for x in (q, k, v))
    tslopes = to_t(slopes).requires_grad_()

    def alibi(score, b, h, q_idx, kv_idx):
        return score + tslopes[h] * (kv_idx - q_idx)

    tbm = tfa.create_block_mask(
        lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None, lq, lq, device="cuda"
    )
    if hasattr(tfa, "AuxRequest"):  # torch >= 2.9; `return_lse` is deprecated
        tout, aux = tfa.flex_attention(
            tq, tk, tv, alibi, tbm, return_aux=tfa.AuxRequest(lse=True)
        )
        tlse = aux.lse
    else:
        tout, tlse = tfa.flex_attention(tq, tk, tv, alibi, tbm, return_lse=True)
    tout.backward(to_t(dout).to(tdtype))
    from_t = lambda x: x.detach().float().cpu().numpy()
    for a, b in [
        (out, tout),
        (lse, tlse),
        (dq, tq.grad),
        (dk, tk.grad),
        (dv, tv.grad),
        (dslopes, tslopes.grad),
    ]:
        a, b = np.asarray(a.astype(jnp.float32)), from_t(b)
        assert np.linalg.norm(a - b) <= 2e-2 * np.linalg.norm(b)
