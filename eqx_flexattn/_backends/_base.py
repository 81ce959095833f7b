"""What every backend receives, and the protocol a backend implements."""

from __future__ import annotations

import abc
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from .._block_mask import BlockMask
from .._mods import INDEX_DTYPE, ScalarMod
from ._config import AbstractConfig, config_for, EmptyConfig, Options


def accumulator_dtype(dtype):
    """Softmax statistics and accumulators: float64 for float64 inputs, else float32."""
    return jnp.float64 if dtype == jnp.float64 else jnp.float32


class AttentionProblem(eqx.Module):
    """One validated attention call: arrays, traced mods and static settings.

    A PyTree: its leaves are q, k, v, the block mask's index arrays and the arrays
    held by the two mods; the rest is static. Gradients of a backend's backward pass
    have this structure (with `None` for leaves that get none).
    """

    q: Float[Array, "b hq lq d"]
    k: Float[Array, "b hkv lkv d"]
    v: Float[Array, "b hkv lkv dv"]
    score_mod: ScalarMod | None
    mask_mod: ScalarMod
    block_mask: BlockMask
    scale: float = eqx.field(static=True)
    # `kernel_options` as given, normalised by `normalise_options`: read them only
    # through `config_for` / `AbstractBackend.config`.
    kernel_options: Options = eqx.field(static=True, default=())

    @property
    def acc_dtype(self):
        return accumulator_dtype(self.q.dtype)

    @property
    def groups(self) -> int:
        """Query heads per key/value head (1 without GQA)."""
        return self.q.shape[1] // self.k.shape[1]

    def config_for(self, backend: AbstractBackend) -> AbstractConfig:
        """`backend`'s validated config, built from `kernel_options`."""
        return config_for(backend.name, self.kernel_options)


class AbstractBackend(eqx.Module):
    """One executor of the flex-attention semantics.

    A backend is a small stateless module with a `name`, a `config_class` (the frozen
    options it reads from `kernel_options`, see
    [`AbstractConfig`][eqx_flexattn._backends._config.AbstractConfig]) and three
    methods. The dispatcher calls `check`, then wires `forward` and `backward` into a
    `custom_vjp`; a backend with `differentiable = True` (the dense reference) is
    differentiated by JAX autodiff instead and needs no `backward`.

    Kernel backends (Pallas) set `interpretable = True`: they take
    `kernel_options={"interpret": True}` and then run on CPU in Pallas interpret
    mode; the test suite runs them so. They also set `runs_per_shard = True`: XLA
    cannot partition a Pallas call, so with q, k, v sharded over batch or heads on
    `Auto` mesh axes the dispatcher wraps `forward` and `backward` in a
    partitioning rule that runs them on each device's shard.
    """

    name: ClassVar[str]
    config_class: ClassVar[type[AbstractConfig] | None] = EmptyConfig
    differentiable: ClassVar[bool] = False
    interpretable: ClassVar[bool] = False
    # XLA cannot partition its kernels (Pallas calls): with inputs sharded on `Auto`
    # mesh axes the dispatcher runs them per shard of batch and heads.
    runs_per_shard: ClassVar[bool] = False

    def config(self, problem: AttentionProblem) -> AbstractConfig:
        """This backend's validated config for `problem`'s `kernel_options`.

        **Raises:** `ValueError` for a key no backend knows, or a bad value of one of
        this backend's options.
        """
        return config_for(self.name, problem.kernel_options)

    def check(self, problem: AttentionProblem) -> None:
        """Whether this backend can run `problem`, on this platform, with its config.

        Called once per trace, before `forward`; it may inspect shapes, dtypes, the
        block mask's static block size, the mods' types and `self.config(problem)`,
        but not array values (they may be tracers).

        **Arguments:**

        - `problem`: the validated call.

        **Returns:** `None` when the backend accepts the problem.

        **Raises:**

        - `NotImplementedError` with one sentence saying what it cannot take and why
            ("head dim 8: Mosaic wgmma needs a multiple of 16", "no NVIDIA GPU of
            compute capability 9.0 or newer"). `auto` then tries the next backend and
            reports the sentence through `explain_backend` and a debug log.
        - `ValueError` for a bad value of one of its options (from `self.config`).

        The default accepts every problem whose config builds.
        """
        self.config(problem)

    @abc.abstractmethod
    def forward(self, problem: AttentionProblem) -> tuple[Array, Array]:
        """The attention output and its log-sum-exp.

        **Arguments:**

        - `problem`: a problem `check` accepted.

        **Returns:** `(out, lse)`: `out` of shape `(B, Hq, Lq, Dv)` in `problem.q`'s
        dtype; `lse` of shape `(B, Hq, Lq)` in `problem.acc_dtype` (float32, float64
        for float64 inputs), natural log. A fully masked row has `out` 0 and `lse`
        `-inf`, and no NaN anywhere.

        **Raises:** nothing for a problem `check` accepted.
        """

    def backward(
        self,
        problem: AttentionProblem,
        out: Array,
        lse: Array,
        dout: Array | None,
        dlse: Array | None,
        perturbed: AttentionProblem,
    ) -> AttentionProblem:
        """The gradient of `forward`'s outputs' cotangents with respect to `problem`.

        **Arguments:**

        - `problem`: as given to `forward`.
        - `out`, `lse`: what `forward` returned.
        - `dout`: the cotangent of `out` (same shape and dtype), or `None` (zero).
        - `dlse`: the cotangent of `lse`, or `None` (zero; `return_lse=False`).
        - `perturbed`: `problem`'s structure with `bool` leaves, True where a
            gradient is needed (Equinox's `filter_custom_vjp` convention); a backend
            may skip the work for the others.

        **Returns:** an `AttentionProblem`-shaped PyTree (build it with
        [`grads_like`][]): `dq`, `dk`, `dv` shaped and typed like `q`, `k`, `v`, the
        score mod's inexact array leaves' gradients in their place, and `None` for
        every other leaf (block mask indices, the mask mod's arrays, integer leaves).

        **Raises:** `NotImplementedError` if the backend has no backward pass (only
        valid with `differentiable = True`).
        """
        raise NotImplementedError(f"the {self.name!r} backend has no backward pass")


def grads_like(problem: AttentionProblem, dq, dk, dv, dscore) -> AttentionProblem:
    """An `AttentionProblem`-shaped gradient: given leaves set, every other None."""
    zero = jax.tree_util.tree_map(
        lambda _: None, eqx.filter(problem, eqx.is_inexact_array)
    )
    zero = eqx.tree_at(
        lambda p: (p.q, p.k, p.v), zero, (dq, dk, dv), is_leaf=lambda x: x is None
    )
    if dscore is None:  # score mod absent or not differentiated: all its leaves None
        return zero
    return eqx.tree_at(lambda p: p.score_mod, zero, dscore)


def block_positions(block: Array, size: int) -> Array:
    """Element positions of blocks: `block[..., None] * size + arange(size)`."""
    block = block.astype(INDEX_DTYPE)[..., None]
    return block * size + jnp.arange(size, dtype=INDEX_DTYPE)


def mod_grad_dtype(leaf_dtype, acc_dtype):
    """The dtype a score-mod parameter's gradient is accumulated in: the accumulator
    dtype, or the parameter's own when that is wider (float64 parameters)."""
    return jnp.promote_types(leaf_dtype, acc_dtype)


def upcast_mod(score_mod, acc_dtype):
    """`score_mod` with its inexact leaves in `mod_grad_dtype`: differentiate this one,
    so its gradients come out (and are summed over tiles) in float32 even for a
    bfloat16 table."""
    return jax.tree_util.tree_map(
        lambda x: (
            x.astype(mod_grad_dtype(x.dtype, acc_dtype))
            if eqx.is_inexact_array(x)
            else x
        ),
        score_mod,
    )


def zero_mod_grads(score_mod, acc_dtype):
    """Zeros for the score mod's inexact leaves (None elsewhere), in `mod_grad_dtype`:
    the initial value of the reduction over tiles."""
    return jax.tree_util.tree_map(
        lambda x: jnp.zeros(x.shape, mod_grad_dtype(x.dtype, acc_dtype)),
        eqx.filter(score_mod, eqx.is_inexact_array),
    )


def add_mod_grads(total, tile):
    """One step of the reduction over tiles: adds a tile's parameter gradients,
    cast to the accumulator's dtype, to the running `total`."""
    return jax.tree_util.tree_map(lambda t, g: t + g.astype(t.dtype), total, tile)


def finish_mod_grads(total, score_mod):
    """Casts the accumulated gradients back to each parameter's dtype, once."""
    params = eqx.filter(score_mod, eqx.is_inexact_array)
    return jax.tree_util.tree_map(lambda t, p: t.astype(p.dtype), total, params)


def score_mod_vjp(fn, s, score_mod, acc_dtype):
    """`fn(s, score_mod)` and its VJP `ds -> (d s, d score_mod)`, the parameter
    gradients in `mod_grad_dtype` (see `upcast_mod`). The scores themselves come from
    the parameters as they are, exactly as in the forward pass."""
    wide = upcast_mod(score_mod, acc_dtype)
    arrays = lambda m: jax.tree_util.tree_leaves(eqx.filter(m, eqx.is_array))
    if [x.dtype for x in arrays(wide)] == [x.dtype for x in arrays(score_mod)]:
        return eqx.filter_vjp(fn, s, score_mod)
    out, vjp_s = jax.vjp(lambda s_: fn(s_, score_mod), s)
    try:
        _, vjp_mod = eqx.filter_vjp(lambda m: fn(s, m), wide)
    except TypeError:
        # The mod's program mixes a widened array with values of its own dtype
        # (`slopes * (kv - q).astype(slopes.dtype)`): run it on the arrays in
        # their own dtypes, narrowed inside, so the cotangents still leave wide.
        narrow = lambda m: jax.tree_util.tree_map(
            lambda w, x: w.astype(x.dtype) if eqx.is_inexact_array(x) else w,
            m,
            score_mod,
        )
        _, vjp_mod = eqx.filter_vjp(lambda m: fn(s, narrow(m)), wide)
    return out, lambda ds: (vjp_s(ds)[0], vjp_mod(ds)[0])
