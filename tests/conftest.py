import jax
import pytest


# Tests compare against float64 oracles. float32 matmuls at full precision: on GPUs
# JAX's default precision for them is TF32.
jax.config.update("jax_enable_x64", True)
jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture
def getkey():
    """A fresh PRNG key on every call, deterministic per test."""
    state = [jax.random.key(0)]

    def _getkey():
        state[0], sub = jax.random.split(state[0])
        return sub

    return _getkey


@pytest.fixture(autouse=True)
def _interpret_kernel_backends(request, monkeypatch):
    """A test parametrised over `backend` runs a kernel backend in interpret mode on
    a machine without GPU: every call's kernel_options get `{name: {"interpret":
    True}}` (merged under the test's own section for that backend)."""
    callspec = getattr(request.node, "callspec", None)
    name = callspec.params.get("backend") if callspec else None
    if not isinstance(name, str):
        return
    from eqx_flexattn import _attention
    from eqx_flexattn._backends import BACKENDS

    from helpers import interpret_options

    extra = interpret_options(name) if name in BACKENDS else {}
    if not extra:
        return
    normalise = _attention.normalise_options

    def with_interpret(options):
        options = dict(options or {})
        options[name] = {**extra[name], **dict(options.get(name) or {})}
        return normalise(options)

    monkeypatch.setattr(_attention, "normalise_options", with_interpret)
