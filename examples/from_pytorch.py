"""PyTorch's FlexAttention tutorial, ported to eqx_flexattn by changing the imports.

The code below follows the PyTorch blog post "FlexAttention: The Flexibility of
PyTorch with the Performance of FlashAttention" (pytorch.org/blog/flexattention) and
the attention-gym examples (github.com/pytorch-labs/attention-gym): every score mod
and mask mod body, and every call to `create_block_mask`, `flex_attention`,
`and_masks` and `or_masks`, is written as PyTorch users write it (`torch.where`,
`torch.tanh`, integer comparisons, closures over tensors such as `alibi_bias[h]`,
`prefix_length[b]` and `document_id[q_idx]`, `device="cuda"`). What changed:

- The imports: `from torch.nn.attention.flex_attention import ...` became
  `from eqx_flexattn import ...`.
- `import torch` became the SHIM section below: a `torch` namespace built from
  `jax.numpy`, `jax.random` and numpy with the few functions the tutorial calls.
  `torch.randn` draws from a fixed `jax.random` key sequence and ignores `device=`
  and `requires_grad=` (JAX places arrays itself and differentiates with `jax.grad`,
  so the tutorial's `.backward()` calls are left out). `torch.float16` is float32
  there: half-precision matmuls are emulated on a CPU, and this script is meant to
  run on one in seconds. `torch.unique_consecutive` runs in numpy (eagerly, like
  the tutorial's setup code).
- The sizes are small (B=2, H=4, S=256, D=64) and a few constants shrink with them
  (the sliding window is 64 instead of 1024).
- After each call the script checks the output against a dense numpy computation of
  the same score mod and mask (float64) and against
  `flex_attention(..., backend="reference")`, and prints one line per variant.

attention-gym's generators name the masks they build (`mask.__name__ = "..."`); that
works on what `and_masks` and `or_masks` return too.

`create_block_mask(..., device="cuda")` works: eqx_flexattn ignores `device=` with a
one-time UserWarning note. The eager calls below warn once that they are slow (jit
them, as the tutorial's `torch.compile(flex_attention)` does, for speed).

Run: python examples/from_pytorch.py
"""

import types

import jax
import jax.numpy as jnp
import numpy as np

import eqx_flexattn as fa


# ---- SHIM: the torch functions the tutorial calls, from jax.numpy (not PyTorch) ----
def _shim_torch():
    keys = iter(jax.random.split(jax.random.key(0), 1000))

    def randn(*shape, device=None, dtype=jnp.float32, requires_grad=False):
        return jax.random.normal(next(keys), shape, dtype)

    def randint(low, high, size, device=None, dtype=jnp.int32):
        return jax.random.randint(next(keys), size, low, high, dtype)

    def unique_consecutive(x, return_counts=False):
        x = np.asarray(x)
        starts = np.flatnonzero(np.r_[True, x[1:] != x[:-1]])
        counts = np.diff(np.r_[starts, len(x)])
        values = jnp.asarray(x[starts])
        return (values, jnp.asarray(counts)) if return_counts else values

    return types.SimpleNamespace(
        randn=randn,
        randint=randint,
        unique_consecutive=unique_consecutive,
        arange=lambda *a, device=None, dtype=None: jnp.arange(*a, dtype=dtype),
        tensor=lambda data, device=None, dtype=None: jnp.asarray(data, dtype),
        repeat_interleave=jnp.repeat,
        cat=jnp.concatenate,
        where=jnp.where,
        tanh=jnp.tanh,
        exp2=jnp.exp2,
        float16=jnp.float32,  # on a CPU: see the docstring
        float32=jnp.float32,
        int32=jnp.int32,
    )


torch = _shim_torch()
# ---- end of SHIM ----

# was: from torch.nn.attention.flex_attention import (
#     and_masks, create_block_mask, flex_attention, or_masks)
from eqx_flexattn import (  # noqa: E402
    and_masks,
    create_block_mask,
    flex_attention,
    or_masks,
)


B, H, S, D = 2, 4, 256, 64
TOLERANCE = 1e-4


def _dense(query, key, value, score_mod, mask_mod):
    """The attention of the tutorial's definition, densely, in float64 numpy."""
    q, k, v = (np.asarray(x, np.float64) for x in (query, key, value))
    b = jnp.arange(B)[:, None, None, None]
    h = jnp.arange(H)[None, :, None, None]
    q_idx = jnp.arange(S)[None, None, :, None]
    kv_idx = jnp.arange(S)[None, None, None, :]
    scores = np.einsum("bhqd,bhkd->bhqk", q, k) / np.sqrt(D)
    if score_mod is not None:  # the mods broadcast: they only use array operations
        scores = np.asarray(score_mod(jnp.asarray(scores), b, h, q_idx, kv_idx))
        scores = scores.astype(np.float64)
    if mask_mod is not None:
        keep = np.broadcast_to(np.asarray(mask_mod(b, h, q_idx, kv_idx)), scores.shape)
        scores = np.where(keep, scores, -np.inf)
    scores = scores - scores.max(-1, keepdims=True)
    weights = np.exp(scores)
    return (weights / weights.sum(-1, keepdims=True)) @ v


def main():
    """Runs every variant; returns {variant: max |error|} over both checks."""
    errors = {}

    def check(name, out, score_mod=None, block_mask=None):
        mask_mod = None if block_mask is None else block_mask.mask_mod
        dense = _dense(query, key, value, score_mod, mask_mod)
        reference = fa.flex_attention(
            query, key, value, score_mod, block_mask, backend="reference"
        )
        errors[name] = max(
            float(np.max(np.abs(np.asarray(out, np.float64) - dense))),
            float(jnp.max(jnp.abs(out - reference))),
        )
        status = "ok" if errors[name] < TOLERANCE else "MISMATCH"
        print(f"{name:44s} max |error| = {errors[name]:.2e}  {status}")

    # ---------------- the tutorial's code, unchanged from here on ----------------
    query = torch.randn(
        B, H, S, D, device="cuda", dtype=torch.float16, requires_grad=True
    )
    key = torch.randn(
        B, H, S, D, device="cuda", dtype=torch.float16, requires_grad=True
    )
    value = torch.randn(
        B, H, S, D, device="cuda", dtype=torch.float16, requires_grad=True
    )

    # No-op: plain attention.
    def noop(score, b, h, q_idx, kv_idx):
        return score

    check("noop", flex_attention(query, key, value, score_mod=noop), noop)

    # Relative positional encoding.
    def relative_positional(score, b, h, q_idx, kv_idx):
        return score + (q_idx - kv_idx)

    out = flex_attention(query, key, value, score_mod=relative_positional)
    check("relative_positional", out, relative_positional)

    # ALiBi: a per-head slope tensor captured by the score mod.
    def generate_alibi_bias():
        return torch.exp2(-((torch.arange(H, device="cuda") + 1) * 8.0 / H))

    alibi_bias = generate_alibi_bias()  # [num_heads]

    def alibi(score, b, h, q_idx, kv_idx):
        bias = alibi_bias[h] * (kv_idx - q_idx)
        return score + bias

    check("alibi", flex_attention(query, key, value, score_mod=alibi), alibi)

    # Tanh soft-capping.
    softcap = 20

    def soft_cap(score, b, h, q_idx, kv_idx):
        score = score / softcap
        score = torch.tanh(score)
        score = score * softcap
        return score

    check("soft_cap", flex_attention(query, key, value, score_mod=soft_cap), soft_cap)

    # Causal attention as a score mod.
    def causal(score, b, h, q_idx, kv_idx):
        return torch.where(q_idx >= kv_idx, score, -float("inf"))

    check(
        "causal (score_mod)",
        flex_attention(query, key, value, score_mod=causal),
        causal,
    )

    # Causal attention as a block mask: blocks above the diagonal are skipped.
    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    block_mask = create_block_mask(
        causal, B=None, H=None, Q_LEN=S, KV_LEN=S, device="cuda"
    )
    check(
        "causal (block_mask)",
        flex_attention(query, key, value, block_mask=block_mask),
        None,
        block_mask,
    )

    # Sliding window + causal.
    SLIDING_WINDOW = 64

    def sliding_window_causal(b, h, q_idx, kv_idx):
        causal_mask = q_idx >= kv_idx
        window_mask = q_idx - kv_idx <= SLIDING_WINDOW
        return causal_mask & window_mask

    block_mask = create_block_mask(
        sliding_window_causal, B=None, H=None, Q_LEN=S, KV_LEN=S, device="cuda"
    )
    out = flex_attention(query, key, value, block_mask=block_mask)
    check("sliding_window_causal", out, None, block_mask)

    # ... or, combining mask mods with and_masks.
    def causal_mask(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    def sliding_window(b, h, q_idx, kv_idx):
        return q_idx - kv_idx <= SLIDING_WINDOW

    sliding_window_causal = and_masks(causal_mask, sliding_window)
    block_mask = create_block_mask(
        sliding_window_causal, B=None, H=None, Q_LEN=S, KV_LEN=S, device="cuda"
    )
    out = flex_attention(query, key, value, block_mask=block_mask)
    check("and_masks(causal, sliding_window)", out, None, block_mask)

    # PrefixLM: a per-sequence prefix (a [B] tensor) attends bidirectionally.
    prefix_length = torch.randint(S // 8, S // 2, (B,), device="cuda")

    def prefix_mask(b, h, q_idx, kv_idx):
        return kv_idx <= prefix_length[b]

    prefix_lm_causal = or_masks(prefix_mask, causal_mask)
    # Our mask is different per sequence, so we set B equal to our batch size
    block_mask = create_block_mask(
        prefix_lm_causal, B=B, H=None, Q_LEN=S, KV_LEN=S, device="cuda"
    )
    out = flex_attention(query, key, value, block_mask=block_mask)
    check("or_masks(prefix, causal)", out, None, block_mask)

    # Document masking (sample packing): the document that each token belongs to,
    # e.g. [0, 0, 0, 1, 1, 2, 2, 2, 2, 2, 2] for sequence lengths 3, 2 and 6.
    lengths = torch.tensor([40, 100, 16, 100], device="cuda")
    document_id = torch.repeat_interleave(
        torch.arange(len(lengths), device="cuda"), lengths
    )

    def document_masking(b, h, q_idx, kv_idx):
        return document_id[q_idx] == document_id[kv_idx]

    block_mask = create_block_mask(
        document_masking, B=None, H=None, Q_LEN=S, KV_LEN=S, device="cuda"
    )
    out = flex_attention(query, key, value, block_mask=block_mask)
    check("document_masking", out, None, block_mask)

    # Any mask mod, applied within each document: logical positions per document.
    def generate_doc_mask_mod(mask_mod, document_id):
        # Get unique document IDs and their counts
        _, counts = torch.unique_consecutive(document_id, return_counts=True)
        # Create cumulative counts (offsets)
        offsets = torch.cat(
            [torch.tensor([0], device=document_id.device), counts.cumsum(0)[:-1]]
        )

        def doc_mask_wrapper(b, h, q_idx, kv_idx):
            same_doc = document_id[q_idx] == document_id[kv_idx]
            q_logical = q_idx - offsets[document_id[q_idx]]
            kv_logical = kv_idx - offsets[document_id[kv_idx]]
            inner_mask = mask_mod(b, h, q_logical, kv_logical)
            return same_doc & inner_mask

        return doc_mask_wrapper

    document_causal = generate_doc_mask_mod(causal_mask, document_id)
    block_mask = create_block_mask(
        document_causal, B=None, H=None, Q_LEN=S, KV_LEN=S, device="cuda"
    )
    out = flex_attention(query, key, value, block_mask=block_mask)
    check("generate_doc_mask_mod(causal)", out, None, block_mask)

    # A score mod and a block mask together: soft-capping with a sliding window.
    block_mask = create_block_mask(
        sliding_window_causal, B=None, H=None, Q_LEN=S, KV_LEN=S, device="cuda"
    )
    out = flex_attention(query, key, value, score_mod=soft_cap, block_mask=block_mask)
    check("soft_cap + sliding_window_causal", out, soft_cap, block_mask)

    # attention-gym's ALiBi: the slope computed inside the score mod.
    def generate_alibi_bias(H):
        def alibi_mod(score, b, h, q_idx, kv_idx):
            scale = torch.exp2(-((h + 1) * 8.0 / H))
            bias = (kv_idx - q_idx) * scale
            return score + bias

        return alibi_mod

    alibi_mod = generate_alibi_bias(H)
    block_mask = create_block_mask(
        causal_mask, B=None, H=None, Q_LEN=S, KV_LEN=S, device="cuda"
    )
    out = flex_attention(query, key, value, score_mod=alibi_mod, block_mask=block_mask)
    check("alibi_mod + causal (attn-gym)", out, alibi_mod, block_mask)

    # attention-gym's mask and score mod generators, which name what they return.
    def generate_sliding_window(window_size):
        def sliding_window(b, h, q_idx, kv_idx):
            return q_idx - kv_idx <= window_size

        sliding_window_mask = and_masks(sliding_window, causal_mask)
        sliding_window_mask.__name__ = f"sliding_window_{window_size}"
        return sliding_window_mask

    def generate_prefix_lm_mask(prefix_length):
        def prefix_mask(b, h, q_idx, kv_idx):
            return kv_idx < prefix_length

        prefix_lm_causal_mask = or_masks(prefix_mask, causal_mask)
        prefix_lm_causal_mask.__name__ = f"prefix_lm_causal_mask_{prefix_length}"
        return prefix_lm_causal_mask

    def generate_tanh_softcap(soft_cap):
        def tanh_softcap(score, b, h, q_idx, kv_idx):
            return soft_cap * torch.tanh(score / soft_cap)

        tanh_softcap.__name__ = f"tanh_softcap_{soft_cap}"
        return tanh_softcap

    sliding_window_mask = generate_sliding_window(window_size=32)
    block_mask = create_block_mask(
        sliding_window_mask, B=None, H=None, Q_LEN=S, KV_LEN=S, device="cuda"
    )
    out = flex_attention(query, key, value, block_mask=block_mask)
    check(f"{sliding_window_mask.__name__} (attn-gym)", out, None, block_mask)

    prefix_lm_causal_mask = generate_prefix_lm_mask(prefix_length=100)
    tanh_softcap = generate_tanh_softcap(30)
    block_mask = create_block_mask(
        prefix_lm_causal_mask, B=None, H=None, Q_LEN=S, KV_LEN=S, device="cuda"
    )
    out = flex_attention(
        query, key, value, score_mod=tanh_softcap, block_mask=block_mask
    )
    check(
        f"{prefix_lm_causal_mask.__name__} + {tanh_softcap.__name__}",
        out,
        tanh_softcap,
        block_mask,
    )
    # ---------------- end of the tutorial's code ----------------

    bad = sorted(name for name, error in errors.items() if not error < TOLERANCE)
    print(f"{len(errors) - len(bad)} of {len(errors)} variants match", *bad)
    return errors


if __name__ == "__main__":
    main()
