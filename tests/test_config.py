"""kernel_options: per-backend configs, foreign/PyTorch/typo keys, the registry."""

import logging
import sys
import types

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import backend_params, decline_reason, numpy_attention, random_qkv

import eqx_flexattn as fa
from eqx_flexattn import _backends
from eqx_flexattn._backends import _config
from eqx_flexattn._backends._config import (
    AbstractConfig,
    check_bool,
    check_positive_int,
    config_for,
    normalise_options,
)
from eqx_flexattn._backends.xla import XlaBackend, XlaConfig


class FakeConfig(AbstractConfig):
    """A kernel backend's config: tile sizes PyTorch's BLOCK_M/BLOCK_N map to."""

    torch_names = {"BLOCK_M": "tile_q", "BLOCK_N": "tile_kv"}
    tile_q: int = eqx.field(static=True, default=64)
    tile_kv: int = eqx.field(static=True, default=64)
    interpret: bool = eqx.field(static=True, default=False)

    def __check_init__(self):
        check_positive_int("fake", "tile_q", self.tile_q)
        check_positive_int("fake", "tile_kv", self.tile_kv)
        check_bool("fake", "interpret", self.interpret)


class FakeBackend(XlaBackend):
    """Runs the xla loops, configured like a kernel backend."""

    name = "fake"
    config_class = FakeConfig


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setitem(_backends.BACKENDS, "fake", FakeBackend())
    monkeypatch.setattr(_config, "_NOTED", set())


def opts(**kw):
    return normalise_options(kw)


def test_xla_config():
    assert config_for("xla", ()) == XlaConfig(row_groups=1)
    assert config_for("xla", opts(row_groups=3)).row_groups == 3
    both = opts(row_groups=3, xla={"row_groups": 2})
    assert config_for("xla", both).row_groups == 2  # sections win
    with pytest.raises(ValueError, match=r"xla backend: .*\['row_groups'\] .* got 0"):
        config_for("xla", opts(xla={"row_groups": 0}))
    with pytest.raises(ValueError, match="positive int, got True"):
        XlaConfig(row_groups=True)
    assert hash(config_for("xla", both)) == hash(XlaConfig(row_groups=2))


def test_foreign_keys_are_ignored(fake, caplog):
    with caplog.at_level(logging.DEBUG, logger="eqx_flexattn"):
        q, k, v = random_qkv(jax_key(), 1, 1, 1, 8, 8, 4)
        out = fa.flex_attention(q, k, v, backend="xla", kernel_options={"tile_q": 16})
    np.testing.assert_allclose(out, numpy_attention(q, k, v)[0], atol=1e-12)
    assert "ignores kernel_options ['tile_q']" in caplog.text
    assert config_for("fake", opts(row_groups=2, tile_q=16)) == FakeConfig(tile_q=16)
    # Another backend's section is ignored too; a bad value in it still raises.
    assert config_for("xla", opts(fake={"tile_q": 8})) == XlaConfig()
    with pytest.raises(ValueError, match=r"fake backend: .*\['tile_q'\].* got -1"):
        fa.flex_attention(q, k, v, backend="xla", kernel_options={"tile_q": -1})


def test_torch_keys(fake, monkeypatch):
    from eqx_flexattn._backends import _config

    # The notes come once per process: start from none noted (test order).
    monkeypatch.setattr(_config, "_NOTED", set())
    options = opts(BLOCK_M=32, BLOCK_N=16, PRESCALE_QK=True, fwd_BLOCK_M1=8)
    assert config_for("fake", options) == FakeConfig(tile_q=32, tile_kv=16)
    # An explicit field wins over the PyTorch name mapped to it, a section over both.
    assert config_for("fake", opts(BLOCK_M=32, tile_q=8)).tile_q == 8
    assert config_for("fake", opts(tile_q=8, fake={"BLOCK_M": 4})).tile_q == 4
    with pytest.raises(ValueError, match=r"fake backend: .*\['tile_q'\].* got 0"):
        config_for("fake", opts(BLOCK_M=0))
    q, k, v = random_qkv(jax_key(), 1, 1, 1, 8, 8, 4)
    with pytest.warns(UserWarning) as record:
        fa.flex_attention(q, k, v, backend="xla", kernel_options={"BLOCK_M": 64})
        fa.flex_attention(q, k, v, backend="xla", kernel_options={"BLOCK_M": 64})
        fa.flex_attention(q, k, v, backend="fake", kernel_options=dict(options))
    notes = sorted(str(w.message) for w in record)
    # (The once-per-process eager-call warning may come too, depending on test order.)
    assert [n for n in notes if n.startswith("kernel_options")] == [
        "kernel_options['BLOCK_M'] (a PyTorch FlexAttention option) has no equivalent"
        " in the 'xla' backend and is ignored.",
        "kernel_options['PRESCALE_QK'] (a PyTorch FlexAttention option) has no "
        "equivalent in the 'fake' backend and is ignored.",
        "kernel_options['fwd_BLOCK_M1'] (a PyTorch FlexAttention option) has no "
        "equivalent in the 'fake' backend and is ignored.",
    ]


def test_typos_and_bad_sections(fake):
    q, k, v = random_qkv(jax_key(), 1, 1, 1, 8, 8, 4)
    with pytest.raises(ValueError, match="'row_group' .* Did you mean 'row_groups'"):
        fa.flex_attention(q, k, v, kernel_options={"row_group": 2})
    with pytest.raises(ValueError, match=r"Accepted: backend options \[.*'tile_kv', "):
        fa.flex_attention(q, k, v, kernel_options={"BLOCKM": 2})
    # Inside a section only that backend's keys (and common/PyTorch keys) are valid.
    with pytest.raises(ValueError, match=r"\['xla'\] key 'tile_q' is not an option"):
        fa.flex_attention(q, k, v, kernel_options={"xla": {"tile_q": 2}})
    with pytest.raises(ValueError, match=r"kernel_options\['xla'\] must be a dict"):
        fa.flex_attention(q, k, v, kernel_options={"xla": 2})
    with pytest.raises(TypeError, match="must be hashable"):
        fa.flex_attention(q, k, v, kernel_options={"row_groups": [2]})
    # The common key `interpret` is accepted by every backend.
    out = fa.flex_attention(q, k, v, kernel_options={"interpret": True})
    np.testing.assert_allclose(out, numpy_attention(q, k, v)[0], atol=1e-12)


def test_per_backend_section_reaches_the_loops(getkey):
    """`{"xla": {"row_groups": 3}}` is what the xla loops see."""
    from eqx_flexattn._attention import _problem

    q, k, v = random_qkv(getkey(), 1, 1, 1, 8, 8, 4)
    problem = _problem(q, k, v, None, None, None, False, {"xla": {"row_groups": 3}})
    assert problem.config_for(XlaBackend()).row_groups == 3
    assert XlaBackend().config(problem) == XlaConfig(row_groups=3)


def test_nn_layer_keeps_sections():
    from eqx_flexattn.nn import MultiheadFlexAttention

    layer = MultiheadFlexAttention(
        2, 8, kernel_options={"xla": {"row_groups": 2}}, key=jax_key()
    )
    assert layer.kernel_options == (("xla", (("row_groups", 2),)),)
    x = jnp.ones((4, 8))
    assert layer(x, x, x).shape == (4, 8)


def test_unimportable_backend_declines(monkeypatch, getkey):
    """A backend module that fails to import becomes a declining placeholder."""
    broken = types.ModuleType("eqx_flexattn_test_broken")

    def __getattr__(attr):
        raise AttributeError("module 'jax.experimental.pallas' has no 'mosaic_gpu'")

    broken.__getattr__ = __getattr__
    monkeypatch.setitem(sys.modules, "eqx_flexattn_test_broken", broken)
    monkeypatch.setattr(_backends, "BACKENDS", dict(_backends.BACKENDS))
    monkeypatch.setattr(_backends, "AUTO_ORDER", ())
    _backends.register("missing", "eqx_flexattn_test_missing_module", "Backend")
    _backends.register("broken", "eqx_flexattn_test_broken", "BrokenBackend")
    _backends.register("xla", ".xla", "XlaBackend")
    assert _backends.AUTO_ORDER == ("missing", "broken", "xla")

    q, k, v = random_qkv(getkey(), 1, 1, 1, 8, 8, 4)
    lines = fa.explain_backend(q, k, v).splitlines()
    here = f"with jax {jax.__version__} on Python {sys.version_info[0]}." + str(
        sys.version_info[1]
    )
    assert lines[:3] == [
        "backend: xla",
        f"declined: missing: the 'missing' backend is unavailable {here} "
        "(ModuleNotFoundError: No module named 'eqx_flexattn_test_missing_module')",
        f"declined: broken: the 'broken' backend is unavailable {here} "
        "(AttributeError: module 'jax.experimental.pallas' has no 'mosaic_gpu')",
    ]
    assert all(line.startswith("other: ") for line in lines[3:])  # the rest
    with pytest.raises(NotImplementedError, match="'broken' backend is unavailable"):
        fa.flex_attention(q, k, v, backend="broken")
    assert "(AttributeError: module" in decline_reason("broken")
    params = {p.id: p for p in backend_params()}
    assert params["broken"].marks[0].kwargs["reason"].startswith("broken: the ")
    assert not params["xla"].marks
    # Its section is accepted unchecked: its options are unknown without its module.
    out = fa.flex_attention(q, k, v, kernel_options={"broken": {"tile_q": 8}})
    np.testing.assert_allclose(out, numpy_attention(q, k, v)[0], atol=1e-12)


def jax_key():
    import jax

    return jax.random.key(0)


def test_unavailable_mosaic_says_what_it_needs(monkeypatch, getkey):
    """On Python 3.11 pip gives jax 0.10, which has no Mosaic GPU kernels: the reason
    names the backend, the versions found, and what it needs, GPU included."""
    old_jax = types.ModuleType("eqx_flexattn_test_old_jax_mosaic")

    def __getattr__(attr):
        raise ImportError("the Mosaic GPU kernels need jax >= 0.11, this is jax 0.10.2")

    old_jax.__getattr__ = __getattr__
    monkeypatch.setitem(sys.modules, "eqx_flexattn_test_old_jax_mosaic", old_jax)
    monkeypatch.setattr(_backends, "BACKENDS", dict(_backends.BACKENDS))
    monkeypatch.setattr(_backends, "NEEDS", dict(_backends.NEEDS))
    monkeypatch.setattr(_backends, "AUTO_ORDER", ())
    needs = _backends.NEEDS["mosaic"]
    _backends.register("mosaic", "eqx_flexattn_test_old_jax_mosaic", "X", needs=needs)
    _backends.register("xla", ".xla", "XlaBackend")
    assert "NVIDIA Hopper (sm90)" in needs and "Python >= 3.12" in needs

    q, k, v = random_qkv(getkey(), 1, 1, 1, 8, 8, 4)
    for backend in ("auto", "mosaic"):
        lines = fa.explain_backend(q, k, v, backend=backend).splitlines()
        (mosaic,) = [line for line in lines if line.startswith("declined: mosaic: ")]
        assert "this is jax 0.10.2" in mosaic and f"it needs {needs}" in mosaic
        assert f"Python {sys.version_info[0]}.{sys.version_info[1]}" in mosaic
    assert lines[0] == (
        "backend: none (flex_attention(..., backend='mosaic') raises "
        "NotImplementedError)"
    )
    assert any(line.startswith("other: xla: accepts these inputs") for line in lines)
    with pytest.raises(NotImplementedError) as info:
        fa.flex_attention(q, k, v, backend="mosaic")
    message = str(info.value)
    assert message.startswith("backend='mosaic' can't run this call: the 'mosaic'")
    assert message.count(needs) == 1 and "backend='auto'" in message


def test_explicit_backend_decline_names_backend_and_needs(monkeypatch, getkey):
    class GpuOnly(_backends.XlaBackend):
        name = "gpu_only"

        def check(self, problem):
            raise NotImplementedError("it needs a GPU; JAX runs on cpu.")

    monkeypatch.setitem(_backends.BACKENDS, "gpu_only", GpuOnly())
    monkeypatch.setitem(_backends.NEEDS, "gpu_only", "a GPU and jax >= 9")
    q, k, v = random_qkv(getkey(), 1, 1, 1, 8, 8, 4)
    lines = fa.explain_backend(q, k, v, backend="gpu_only").splitlines()
    assert lines[:2] == [
        "backend: none (flex_attention(..., backend='gpu_only') raises "
        "NotImplementedError)",
        "declined: gpu_only: it needs a GPU; JAX runs on cpu.",
    ]
    others = {line.split(": ")[1] for line in lines[2:]}
    assert others == set(_backends.BACKENDS) - {"gpu_only"}
    with pytest.raises(NotImplementedError) as info:
        fa.flex_attention(q, k, v, backend="gpu_only")
    assert str(info.value).startswith(
        "backend='gpu_only' can't run this call: it needs a GPU; JAX runs on cpu. "
        "The 'gpu_only' backend needs a GPU and jax >= 9. "
    )
