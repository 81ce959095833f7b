"""Pallas Mosaic GPU kernels run on CPU in interpret mode, through the test machinery.

Mosaic GPU's interpreter needs jax >= 0.11 (research/pallas-interpret/README.md).
"""

import functools as ft

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import numpy_attention, on_gpu, random_qkv

import eqx_flexattn as fa
from eqx_flexattn import _backends
from eqx_flexattn._backends._config import AbstractConfig, check_bool
from eqx_flexattn._backends.xla import XlaBackend


if jax.__version_info__ < (0, 11):
    pytest.skip(
        f"jax {jax.__version__}: the Mosaic GPU interpreter needs jax >= 0.11",
        allow_module_level=True,
    )
plgpu = pytest.importorskip("jax.experimental.pallas.mosaic_gpu")


def add_one(x, interpret: bool):
    """A Mosaic GPU kernel: TMA-copy a tile to SMEM, add 1, copy it back."""

    def body(x_ref, o_ref, smem, barrier):
        plgpu.copy_gmem_to_smem(x_ref, smem, barrier.at[0])
        plgpu.barrier_wait(barrier.at[0])
        smem[...] = smem[...] + 1
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(smem, o_ref)
        plgpu.wait_smem_to_gmem(0)

    kernel = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct(x.shape, x.dtype),
        scratch_types=[plgpu.SMEM(x.shape, x.dtype), plgpu.Barrier(num_barriers=1)],
        interpret=plgpu.InterpretGPUParams() if interpret else None,
    )
    return kernel(x)


def test_mosaic_kernel_in_interpret_mode():
    x = np.arange(64 * 64, dtype=np.float32).reshape(64, 64) / 7
    got = jax.jit(add_one, static_argnums=1)(jnp.asarray(x), not on_gpu())
    np.testing.assert_array_equal(np.asarray(got), x + 1)


class ProbeConfig(AbstractConfig):
    interpret: bool = eqx.field(static=True, default=False)

    def __check_init__(self):
        check_bool("mosaic_probe", "interpret", self.interpret)


class ProbeBackend(XlaBackend):
    """A stand-in kernel backend: xla's output, passed through the Mosaic kernel."""

    name = "mosaic_probe"
    config_class = ProbeConfig
    interpretable = True

    def check(self, problem):
        super().check(problem)
        if not (on_gpu() or self.config(problem).interpret):
            raise NotImplementedError("needs an NVIDIA GPU, or interpret=True")
        if problem.q.shape != (1, 1, 64, 64) or problem.q.dtype != jnp.float32:
            raise NotImplementedError("the probe takes one float32 64x64 head")

    def forward(self, problem):
        out, lse = super().forward(problem)
        tile = add_one(out[0, 0], self.config(problem).interpret)
        return (tile - 1)[None, None], lse


@pytest.fixture(scope="module", autouse=True)
def _probe_registered():
    """Registered before the function-scoped autouse fixture in conftest looks."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(_backends.BACKENDS, "mosaic_probe", ProbeBackend())
        yield


@pytest.mark.parametrize("backend", ["mosaic_probe"])
def test_machinery_runs_kernel_backends_interpreted(backend, getkey):
    """conftest turns interpret mode on for an `interpretable` backend on CPU."""
    q, k, v = random_qkv(getkey(), 1, 1, 1, 64, 64, 64, dtype=jnp.float32)
    out = jax.jit(ft.partial(fa.flex_attention, backend=backend))(q, k, v)
    np.testing.assert_allclose(out, numpy_attention(q, k, v)[0], atol=1e-5)


def test_kernel_backend_declines_without_interpret(getkey):
    if on_gpu():
        pytest.skip("on a GPU the probe runs compiled")
    q, k, v = random_qkv(getkey(), 1, 1, 1, 64, 64, 64, dtype=jnp.float32)
    with pytest.raises(NotImplementedError, match="needs an NVIDIA GPU"):
        fa.flex_attention(q, k, v, backend="mosaic_probe")
