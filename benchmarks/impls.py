"""The registry of implementations: one small object per implementation.

Each `Impl` has a `name`, says why it cannot run at all (`unavailable(env)`), on a
case and config (`supports`) or backward (`backward_problem`) -- a reason string, or
None -- and builds zero-argument steps `make_fwd` / `make_fwdbwd` over the inputs of a
`Workspace`. Steps return what `sync` waits on. Mods, masks and biases are built once
outside the step (as a user would), the attention call itself inside it.

Layouts: eqx_flexattn and torch take `(B, H, L, D)`; `jax.nn.dot_product_attention`,
the Pallas ops and tokamax take `(B, L, H, D)`; the workspace holds both, transposed
once outside the timed steps. Every implementation gets `scale = 1 / sqrt(D)`.

fwd+bwd steps compute the output and the VJP with a fixed random cotangent `do`:
gradients of q, k, v and, for learnable cases, of the score mod's parameters (ALiBi
slopes, relative-bias table).
"""

from __future__ import annotations

import dataclasses
import gc
import math
import sys
import types
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

from . import mods
from .spec import Case, Config, document_ids


# Sizes above which dense (materialising) implementations are skipped.
DENSE_REFERENCE_MAX = 2**22  # B * Hq * Lq * Lkv for eqx_flexattn's reference backend
DENSE_XLA_MAX = 2**28  # ... for jax.nn's dense "xla" implementation
DENSE_BIAS_MAX = 2**30  # Hq * Lq * Lkv for an explicit bias array (tokamax)

NOTES: list[str] = []  # environment notes collected while importing peers


@dataclasses.dataclass(frozen=True)
class Env:
    platform: str  # JAX's default backend: cpu / gpu / tpu
    device: str
    compute_capability: str | None
    quick: bool


def detect_env(quick: bool) -> Env:
    dev = jax.devices()[0]
    return Env(
        platform=jax.default_backend(),
        device=getattr(dev, "device_kind", str(dev)),
        compute_capability=getattr(dev, "compute_capability", None),
        quick=quick,
    )


def scale_of(config: Config) -> float:
    return 1.0 / math.sqrt(config.D)


# --------------------------------------------------------------------- inputs


class Workspace:
    """Random inputs of one config, created on first use, freed by `close`."""

    def __init__(self, config: Config):
        self.config = config
        self._cache: dict[tuple[str, str], Any] = {}

    def _shapes(self):
        c = self.config
        q = (c.B, c.Hq, c.Lq, c.D)
        kv = (c.B, c.Hkv, c.Lkv, c.D)
        return q, kv, kv, q  # q, k, v, do

    def jax_inputs(self, layout: str = "bhld"):
        key = ("jax", layout)
        if key not in self._cache:
            if layout == "bhld":
                dtype = jnp.dtype(self.config.dtype)
                keys = jax.random.split(jax.random.PRNGKey(0), 4)
                arrays = tuple(
                    jax.random.normal(k, s, dtype) for k, s in zip(keys, self._shapes())
                )
            else:
                arrays = tuple(jnp.swapaxes(x, 1, 2) for x in self.jax_inputs("bhld"))
            self._cache[key] = jax.block_until_ready(arrays)
        return self._cache[key]

    def torch_inputs(self, device):
        key = ("torch", str(device))
        if key not in self._cache:
            import torch

            gen = torch.Generator(device=device).manual_seed(0)
            dtype = getattr(torch, self.config.dtype)
            self._cache[key] = tuple(
                torch.randn(s, generator=gen, device=device, dtype=dtype)
                for s in self._shapes()
            )
        return self._cache[key]

    def close(self) -> None:
        self._cache.clear()
        gc.collect()
        if "torch" in sys.modules and sys.modules["torch"].cuda.is_available():
            sys.modules["torch"].cuda.empty_cache()


# ---------------------------------------------------------------- base classes


class Impl:
    name: str = ""
    framework: str = ""

    def unavailable(self, env: Env) -> str | None:
        """Why this implementation cannot run here at all, or None."""
        return None

    def supports(self, case: Case, config: Config) -> str | None:
        """Why this implementation cannot express `case` on `config`, or None."""
        return None

    def backward_problem(self, case: Case, config: Config) -> str | None:
        """Why fwd+bwd cannot be timed (the forward can), or None."""
        return None

    def make_fwd(self, case: Case, config: Config, ws: Workspace) -> Callable[[], Any]:
        raise NotImplementedError

    def make_fwdbwd(
        self, case: Case, config: Config, ws: Workspace
    ) -> Callable[[], Any]:
        raise NotImplementedError

    def sync(self, out: Any) -> None:
        raise NotImplementedError

    def cleanup(self) -> None:
        """Called after every measurement (free cached device memory)."""


class JaxImpl(Impl):
    """A JAX implementation: subclasses give `attention(case, config)`, returning
    `fn(q, k, v, params) -> out` and `params` (a PyTree; its inexact arrays are the
    learnable parameters of learnable cases)."""

    framework = "jax"
    layout = "bhld"

    def attention(self, case: Case, config: Config) -> tuple[Callable, Any]:
        raise NotImplementedError

    def make_fwd(self, case, config, ws):
        fn, params = self.attention(case, config)
        q, k, v, _ = ws.jax_inputs(self.layout)
        return _jitted(fn, params, q, k, v)

    def make_fwdbwd(self, case, config, ws):
        fn, params = self.attention(case, config)
        q, k, v, do = ws.jax_inputs(self.layout)
        return _jitted(_vjp_step(fn, case.learnable), params, q, k, v, do)

    def sync(self, out):
        jax_sync(out)


def _jitted(fn: Callable, params: Any, *args) -> Callable[[], Any]:
    """`lambda: fn(*args[:3], params, *args[3:])` under `jax.jit`.

    Non-array parts of `params` (functions, static fields) are closed over; arrays
    are arguments. Plain `jax.jit` has the lightest dispatch (no per-call PyTree
    filtering), so the timings measure the attention, not the Python around it.
    """
    dynamic, static = eqx.partition(params, eqx.is_array)

    @jax.jit
    def run(dynamic, q, k, v, *rest):
        return fn(q, k, v, eqx.combine(dynamic, static), *rest)

    return lambda: run(dynamic, *args)


def _vjp_step(fn: Callable, learnable: bool, argnums=(0, 1, 2)) -> Callable:
    """`(q, k, v, params, do) -> (out, grads)` of the inputs `argnums` of (q, k, v);
    params get gradients if learnable."""

    def step(q, k, v, params, do):
        def f(*xs):
            args = [q, k, v]
            for i, x in zip(argnums, xs):
                args[i] = x
            return fn(*args, xs[-1] if learnable else params)

        xs = tuple((q, k, v)[i] for i in argnums)
        out, vjp = eqx.filter_vjp(f, *xs, *((params,) if learnable else ()))
        return out, vjp(do)

    return step


def _only_masks(case: Case, config: Config, masks: tuple) -> str | None:
    """The common restriction of peers: a few masks, no score mod, no decode mask."""
    if case.score is not None:
        return f"score mod {case.score!r} not expressible"
    if case.mask not in masks:
        return f"mask {case.mask!r} not expressible"
    if case.mask is not None and config.q_offset:
        return "masks of decoding (queries at the end) not expressible"
    return None


# ---------------------------------------------------------------- eqx_flexattn


class EqxFlex(JaxImpl):
    """eqx_flexattn.flex_attention with one backend of `eqx_flexattn._backends`."""

    def __init__(
        self,
        backend: str,
        kernel_options: dict | None = None,
        variant: str = "",
        dtypes: tuple[str, ...] | None = None,
    ):
        self.backend = backend
        self.kernel_options = kernel_options
        self.name = f"eqx_flexattn.{backend}" + (f":{variant}" if variant else "")
        self.dtypes = dtypes  # None: every dtype

    def supports(self, case, config):
        if self.dtypes is not None and config.dtype not in self.dtypes:
            return f"a variant for {', '.join(self.dtypes)} inputs"
        if self.backend == "reference":
            size = config.B * config.Hq * config.Lq * config.Lkv
            if size > DENSE_REFERENCE_MAX:
                return "dense reference backend: tiny shapes only"
        return None

    def attention(self, case, config):
        import eqx_flexattn as fa

        score_mod, mask_mod = mods.eqx_mods(case, config)
        block_mask = None
        if mask_mod is not None:
            block_mask = fa.create_block_mask(
                mask_mod, None, None, config.Lq, config.Lkv
            )
        scale, gqa, backend = scale_of(config), config.gqa, self.backend
        options = self.kernel_options

        def fn(q, k, v, params):
            score_mod, block_mask = params
            return fa.flex_attention(
                q,
                k,
                v,
                score_mod,
                block_mask,
                scale=scale,
                enable_gqa=gqa,
                kernel_options=options,
                backend=backend,
            )

        return fn, (score_mod, block_mask)


# ------------------------------------------------------------------- JAX peers


class JaxNn(JaxImpl):
    """jax.nn.dot_product_attention: no mask, causal, or causal sliding window."""

    layout = "blhd"

    def __init__(self, implementation: str):
        self.implementation = implementation
        self.name = f"jax.nn.{implementation}"

    def unavailable(self, env):
        if self.implementation == "cudnn" and env.platform != "gpu":
            return "cuDNN needs an NVIDIA GPU"
        return None

    def supports(self, case, config):
        reason = _only_masks(case, config, (None, "causal", "sliding_window"))
        if reason:
            return reason
        if self.implementation == "xla":
            if config.B * config.Hq * config.Lq * config.Lkv > DENSE_XLA_MAX:
                return "dense XLA attention: score matrix too large"
        elif config.dtype not in ("float16", "bfloat16"):
            return "cuDNN takes float16/bfloat16"
        return None

    def attention(self, case, config):
        kwargs = dict(
            scale=scale_of(config),
            is_causal=case.mask in ("causal", "sliding_window"),
            local_window_size=(
                (config.window, 0) if case.mask == "sliding_window" else None
            ),
            implementation=self.implementation,
        )

        def fn(q, k, v, params):
            return jax.nn.dot_product_attention(q, k, v, **kwargs)

        return fn, None


class PallasMha(JaxImpl):
    """jax.experimental.pallas.ops.gpu.attention.mha (Triton): no mask, causal, and
    document-causal through `segment_ids`. Default block sizes."""

    name = "pallas.mha"
    layout = "blhd"

    def __init__(self, interpret: bool = False):
        self.interpret = interpret  # for testing the adapter on a CPU

    def unavailable(self, env):
        if env.platform != "gpu" and not self.interpret:
            return "Pallas Triton kernels need a GPU"
        try:
            from jax.experimental.pallas.ops.gpu import attention  # noqa: F401
        except Exception as e:  # noqa: BLE001
            return f"import failed: {type(e).__name__}: {e}"
        return None

    def supports(self, case, config):
        reason = _only_masks(case, config, (None, "causal", "document"))
        if reason:
            return reason
        if config.gqa:
            return "mha needs Hq == Hkv"
        return None

    def attention(self, case, config):
        from jax.experimental.pallas.ops.gpu import attention

        segment_ids = None
        if case.mask == "document":
            ids = jnp.asarray(document_ids(config.Lkv))
            segment_ids = jnp.broadcast_to(ids, (config.B, config.Lkv))
        kwargs = dict(
            sm_scale=scale_of(config),
            causal=case.mask in ("causal", "document"),
            interpret=self.interpret,
        )

        def fn(q, k, v, segment_ids):
            return attention.mha(q, k, v, segment_ids, **kwargs)

        return fn, segment_ids


class PallasMgpu(JaxImpl):
    """jax.experimental.pallas.ops.gpu.attention_mgpu (Mosaic GPU, Hopper only): no
    mask or causal. It takes no softmax scale: q is multiplied by it first."""

    name = "pallas.mgpu"
    layout = "blhd"

    def unavailable(self, env):
        if env.platform != "gpu":
            return "Mosaic GPU kernels need a GPU"
        if env.compute_capability != "9.0":
            return (
                f"Hopper (sm_90a) only, got compute capability {env.compute_capability}"
            )
        try:
            from jax.experimental.pallas.ops.gpu import attention_mgpu  # noqa: F401
        except Exception as e:  # noqa: BLE001
            return f"import failed: {type(e).__name__}: {e}"
        return None

    def supports(self, case, config):
        reason = _only_masks(case, config, (None, "causal"))
        if reason:
            return reason
        if config.dtype != "float16":
            # Seen on jax 0.11.2: bfloat16 inputs fail inside the kernel with
            # "Expected dtypes to match but src had type bfloat16 and dst had type
            # float16".
            return "float16 only (bfloat16 fails inside jax's attention_mgpu)"
        if config.D % 64:
            return "head dim must be a multiple of 64"
        if config.Lq % 128 or config.Lkv % 128:
            return "sequence lengths must be multiples of 128"
        return None

    def backward_problem(self, case, config):
        if case.mask == "causal":
            return "attention_mgpu has no causal backward pass"
        return None

    def attention(self, case, config):
        from jax.experimental.pallas.ops.gpu import attention_mgpu as mgpu

        tuning = mgpu.TuningConfig(
            block_q=64,
            block_kv=128,
            max_concurrent_steps=2,
            causal=case.mask == "causal",
            compute_wgs_bwd=2 if config.D <= 128 else 1,
            block_q_dkv=64,
            block_kv_dkv=64,
            block_q_dq=64,
            block_kv_dq=64,
        )
        scale = scale_of(config)

        def fn(q, k, v, params):
            return mgpu.attention((q * scale).astype(q.dtype), k, v, tuning)

        return fn, None


def import_tokamax():
    """`import tokamax`; tokamax imports xprof (a profiler it needs only for its own
    benchmarking helpers) at import time, so a missing xprof is replaced by a stub."""
    try:
        import tokamax

        return tokamax
    except ImportError as e:
        if "xprof" not in str(e):
            raise
    for name in [m for m in sys.modules if m == "tokamax" or m.startswith("tokamax.")]:
        del sys.modules[name]
    names = [
        "xprof",
        "xprof.cli",
        "xprof.cli.tools",
        "xprof.cli.tools.get_kernel_stats_tool",
    ]
    stubs = {n: types.ModuleType(n) for n in names}
    for parent, child in zip(names, names[1:]):
        setattr(stubs[parent], child.rsplit(".", 1)[1], stubs[child])
    sys.modules.update(stubs)
    import tokamax

    NOTES.append("tokamax imported with a stub for xprof (its profiling helpers only)")
    return tokamax


class Tokamax(JaxImpl):
    """tokamax.dot_product_attention: causal / sliding window (`is_causal`,
    `local_window_size`), soft-capping (`logits_soft_cap`), and ALiBi / relative
    bias as an explicit `(1, H, Lq, Lkv)` bias built from the learnable parameters
    inside the timed step."""

    layout = "blhd"

    def __init__(self, implementation: str):
        self.implementation = implementation
        self.name = f"tokamax.{implementation}"

    def unavailable(self, env):
        if env.platform != "gpu":
            return "tokamax's Pallas kernels need a GPU"
        try:
            import_tokamax()
        except Exception as e:  # noqa: BLE001
            return f"import failed: {type(e).__name__}: {e}"
        return None

    def supports(self, case, config):
        if case.score == "checkerboard":
            return "score mod 'checkerboard' not expressible"
        if case.mask not in (None, "causal", "sliding_window"):
            return f"mask {case.mask!r} not expressible"
        if case.mask is not None and config.q_offset:
            return "masks of decoding (queries at the end) not expressible"
        if case.score in ("alibi", "relative_bias"):
            if config.Hq * config.Lq * config.Lkv > DENSE_BIAS_MAX:
                return "dense bias array too large"
        return None

    def attention(self, case, config):
        tokamax = import_tokamax()
        kwargs = dict(
            scale=scale_of(config),
            is_causal=case.mask in ("causal", "sliding_window"),
            local_window_size=(
                (config.window, 0) if case.mask == "sliding_window" else None
            ),
            logits_soft_cap=mods.SOFTCAP if case.score == "softcap" else None,
            implementation=self.implementation,
        )

        def fn(q, k, v, param):
            bias = mods.dense_bias(case, config, param, q.dtype)
            return tokamax.dot_product_attention(q, k, v, bias=bias, **kwargs)

        return fn, mods.bias_params(case, config)


# ----------------------------------------------------------------------- torch


class TorchFlex(Impl):
    """torch.compile(torch.nn.attention.flex_attention, dynamic=False) with torch's
    create_block_mask (`_compile=True` above 2**28 mask elements). The compiled
    function is warmed up once on a tiny shape, so no case's `compile_s` carries
    inductor's one-time start-up."""

    name = "torch.flex_attention"
    framework = "torch"

    def __init__(self, tf32: bool = False):
        """`tf32`: a float32-only variant with TF32 matmuls
        (`torch.set_float32_matmul_precision("high")` while it compiles and runs);
        torch's default for float32 is IEEE float32."""
        self._compiled = None
        self.device = None
        self.tf32 = tf32
        if tf32:
            self.name = "torch.flex_attention:tf32"

    def supports(self, case, config):
        if self.tf32 and config.dtype != "float32":
            return "a variant for float32 inputs"
        return None

    def _precision(self, step):
        """`step` run under this variant's float32 matmul precision."""
        if not self.tf32:
            return step
        import torch

        def run():
            old = torch.get_float32_matmul_precision()
            torch.set_float32_matmul_precision("high")
            try:
                return step()
            finally:
                torch.set_float32_matmul_precision(old)

        return run

    def unavailable(self, env):
        try:
            import torch
            from torch.nn.attention import flex_attention  # noqa: F401
        except Exception as e:  # noqa: BLE001
            return f"torch not available ({type(e).__name__}: {e})"
        if not torch.cuda.is_available() and env.quick:
            return "no CUDA: torch.compile on the CPU is too slow for --quick"
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        return None

    def flex(self):
        if self._compiled is None:
            import torch
            import torch._dynamo.config as dynamo_config
            from torch.nn.attention.flex_attention import flex_attention

            # Every case is a new score/mask mod, hence a recompilation.
            for name in (
                "cache_size_limit",
                "recompile_limit",
                "accumulated_cache_size_limit",
                "accumulated_recompile_limit",
            ):
                if hasattr(dynamo_config, name):
                    setattr(dynamo_config, name, 4096)
            self._compiled = torch.compile(flex_attention, dynamic=False)
            if self.device == "cuda":  # one-time inductor start-up, not any case's
                x = torch.randn(1, 1, 128, 16, device="cuda", requires_grad=True)
                self._compiled(x, x, x).sum().backward()
        return self._compiled

    def _setup(self, case, config, ws, requires_grad):
        from torch.nn.attention.flex_attention import create_block_mask

        score_mod, mask_mod, params = mods.torch_mods(
            case, config, self.device, requires_grad
        )
        block_mask = None
        if mask_mod is not None:
            # Uncompiled, torch evaluates the whole Lq x Lkv mask at once (int64).
            block_mask = create_block_mask(
                mask_mod,
                None,
                None,
                config.Lq,
                config.Lkv,
                device=self.device,
                _compile=config.Lq * config.Lkv > 2**28,
            )
        kwargs = dict(
            score_mod=score_mod,
            block_mask=block_mask,
            scale=scale_of(config),
            enable_gqa=config.gqa,
        )
        return ws.torch_inputs(self.device), kwargs, params

    def make_fwd(self, case, config, ws):
        import torch

        (q, k, v, _), kwargs, _ = self._setup(case, config, ws, False)
        flex = self.flex()

        def step():
            with torch.no_grad():
                return flex(q, k, v, **kwargs)

        return self._precision(step)

    def make_fwdbwd(self, case, config, ws):
        import torch

        (q, k, v, do), kwargs, params = self._setup(case, config, ws, case.learnable)
        leaves = [x.detach().requires_grad_() for x in (q, k, v)] + params
        flex = self.flex()

        def step():
            out = flex(*leaves[:3], **kwargs)
            return torch.autograd.grad(out, leaves, do)

        return self._precision(step)

    def sync(self, out):
        torch_sync(out)

    def cleanup(self):
        import torch

        if self.device == "cuda":
            torch.cuda.empty_cache()


def registry() -> list[Impl]:
    """Every implementation, in priority order: eqx_flexattn's backends (whatever
    `eqx_flexattn._backends.BACKENDS` holds; the dense reference last), torch, peers."""
    from eqx_flexattn._backends import BACKENDS

    ours = sorted(BACKENDS, key=lambda n: (n == "reference", n))
    return [
        *(EqxFlex(n) for n in ours),
        # float32 at full precision (JAX's default on GPUs is TF32).
        *(
            EqxFlex("triton", {"triton": {"f32_precision": p}}, p, ("float32",))
            for p in ("tf32x3", "ieee")
            if "triton" in BACKENDS
        ),
        TorchFlex(),
        TorchFlex(tf32=True),
        JaxNn("cudnn"),
        JaxNn("xla"),
        PallasMha(),
        PallasMgpu(),
        Tokamax("mosaic"),
        Tokamax("triton"),
    ]


# ----------------------------------------------------- create_block_mask timings


def jax_sync(out) -> None:
    jax.block_until_ready(out)


def torch_sync(out) -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def eqx_block_mask_step(mask: str, length: int) -> Callable[[], Any]:
    """A step building eqx_flexattn's BlockMask inside `jax.jit`."""
    import eqx_flexattn as fa

    config = Config("mask", 1, 1, 1, length, length, 1, "float32")
    _, mask_mod = mods.eqx_mods(Case(mask, mask=mask), config)
    build = eqx.filter_jit(
        lambda m: fa.create_block_mask(m, None, None, length, length)
    )
    return lambda: build(mask_mod)


def torch_block_mask_step(mask: str, length: int) -> Callable[[], Any]:
    """A step building torch's BlockMask on the GPU (`_compile=True`)."""
    import torch
    from torch.nn.attention.flex_attention import create_block_mask

    if not torch.cuda.is_available():
        raise NotImplementedError("torch's create_block_mask is timed on a GPU only")
    config = Config("mask", 1, 1, 1, length, length, 1, "float32")
    _, mask_mod, _ = mods.torch_mods(Case(mask, mask=mask), config, "cuda", False)
    return lambda: create_block_mask(
        mask_mod, None, None, length, length, device="cuda", _compile=True
    )


def mask_builders(with_torch: bool) -> dict[str, tuple[Callable, Callable]]:
    """{record impl name: (make_step(mask, length), sync)} for create_block_mask."""
    builders = {"eqx_flexattn.create_block_mask": (eqx_block_mask_step, jax_sync)}
    if with_torch:
        builders["torch.create_block_mask"] = (torch_block_mask_step, torch_sync)
    return builders
