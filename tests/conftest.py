import os


# Eight CPU devices for the sharding tests (tests/test_context_parallel.py), set
# before jax starts its backend. Costs nothing measurable elsewhere: computations
# without a mesh run on the first device (test_grads + test_attention + test_mods:
# 152 s of CPU time without the flag, 156 s with it, within noise).
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

import jax  # noqa: E402
import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402


# Test profiles. `default` (what `pytest` runs) covers every behaviour with small
# hypothesis budgets and a cut-down benchmark run: a few minutes on two cores. `full`
# (CI: `.ci/run`, or `pytest --full`, or EQX_FLEXATTN_TEST_PROFILE=full) runs the
# larger budgets. Tests read the profile through `helpers.full_profile()` and
# `helpers.examples(full=..., default=...)`.
PROFILE_VARIABLE = "EQX_FLEXATTN_TEST_PROFILE"
settings.register_profile("default", deadline=None, print_blob=True)
settings.register_profile("full", deadline=None, print_blob=True)


def pytest_addoption(parser):
    parser.addoption(
        "--full",
        action="store_true",
        help=f"the full test profile, as CI runs it (same as {PROFILE_VARIABLE}=full)",
    )


def pytest_configure(config):
    if config.getoption("--full"):
        os.environ[PROFILE_VARIABLE] = "full"
    profile = os.environ.setdefault(PROFILE_VARIABLE, "default")
    if profile not in ("default", "full"):
        raise pytest.UsageError(
            f"{PROFILE_VARIABLE}={profile!r}: choose 'default' or 'full'."
        )
    settings.load_profile(profile)


def pytest_report_header(config):
    return f"eqx_flexattn test profile: {os.environ[PROFILE_VARIABLE]}"


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
    from helpers import interpret_options

    from eqx_flexattn import _attention
    from eqx_flexattn._backends import BACKENDS

    extra = interpret_options(name) if name in BACKENDS else {}
    if not extra:
        return
    normalise = _attention.normalise_options

    def with_interpret(options):
        options = dict(options or {})
        options[name] = {**extra[name], **dict(options.get(name) or {})}
        return normalise(options)

    monkeypatch.setattr(_attention, "normalise_options", with_interpret)
