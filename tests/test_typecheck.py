"""Runtime shape checking of the public API with jaxtyping + beartype.

Two ways to switch it on, both tested:

- in-process, through pytest's `--jaxtyping-packages=eqx_flexattn,beartype.beartype`
  (the `addopts` of `pyproject.toml`);
- `EQX_FLEXATTN_TYPECHECK=1` set before `import eqx_flexattn`, in a fresh interpreter.

Each case calls the API with a wrong shape and records the error; the checks assert
it is a `TypeError` (jaxtyping's `TypeCheckError`) naming the argument and the dims.
"""

import json
import os
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import jax.random as jr
import pytest

import eqx_flexattn as fa
from eqx_flexattn.nn import MultiheadFlexAttention


_TESTS = pathlib.Path(__file__).resolve().parent


def _capture(fn) -> dict:
    try:
        fn()
    except Exception as e:
        return {
            "type": type(e).__name__,
            "is_type_error": isinstance(e, TypeError),
            "message": str(e),
        }
    return {"type": None, "is_type_error": False, "message": ""}


def _qkv(q_shape, k_shape, v_shape):
    return tuple(jnp.ones(s, jnp.float32) for s in (q_shape, k_shape, v_shape))


def run_cases() -> dict[str, dict]:
    """Calls with one wrong shape each; returns what each raised."""
    mha = MultiheadFlexAttention(2, 8, key=jr.key(0), dtype=jnp.float32)
    x = jnp.ones((5, 8), jnp.float32)
    return {
        "flex_head_dim": _capture(
            lambda: fa.flex_attention(*_qkv((1, 2, 8, 4), (1, 2, 8, 6), (1, 2, 8, 4)))
        ),
        "flex_rank": _capture(
            lambda: fa.flex_attention(*_qkv((2, 8, 4), (1, 2, 8, 4), (1, 2, 8, 4)))
        ),
        "flex_kv_length": _capture(
            lambda: fa.flex_attention(*_qkv((1, 2, 8, 4), (1, 2, 8, 4), (1, 2, 9, 4)))
        ),
        "mha_query_size": _capture(lambda: mha(jnp.ones((5, 7), jnp.float32), x, x)),
        "mha_kv_length": _capture(lambda: mha(x, x, jnp.ones((6, 8), jnp.float32))),
        "mha_batched": _capture(lambda: mha(jnp.ones((3, 5, 8), jnp.float32), x, x)),
    }


# (case, parameter named, fragments of the message naming the dims)
EXPECTED = [
    ("flex_head_dim", "key", ["f32[1,2,8,6]", "b hkv lkv d", "d=4"]),
    ("flex_rank", "query", ["f32[2,8,4]", "b hq lq d"]),
    ("flex_kv_length", "value", ["f32[1,2,9,4]", "b hkv lkv dv", "lkv=8"]),
    ("mha_query_size", "query", ["f32[5,7]", "q_seq {self.query_size}"]),
    ("mha_kv_length", "value", ["f32[6,8]", "kv_seq {self.value_size}", "kv_seq=5"]),
    ("mha_batched", "query", ["f32[3,5,8]", "q_seq {self.query_size}"]),
]


def _check(result: dict, param: str, fragments: list[str]) -> None:
    assert result["type"] == "TypeCheckError", result
    assert result["is_type_error"]
    message = result["message"]
    assert f"parameter '{param}'" in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def _instrumented() -> bool:
    return hasattr(fa.flex_attention, "__wrapped__")


@pytest.fixture(scope="module")
def in_process_results():
    if not _instrumented():
        pytest.skip("run without --jaxtyping-packages=eqx_flexattn,beartype.beartype")
    return run_cases()


def _subprocess_results(typecheck: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "EQX_FLEXATTN_TYPECHECK"}
    if typecheck:
        env["EQX_FLEXATTN_TYPECHECK"] = typecheck
    env["JAX_PLATFORMS"] = "cpu"
    script = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); import test_typecheck as t;"
        "print(json.dumps({'instrumented': t._instrumented(), 'cases': t.run_cases()}))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(_TESTS)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def env_var_results():
    return _subprocess_results("1")


@pytest.mark.parametrize("case,param,fragments", EXPECTED, ids=[e[0] for e in EXPECTED])
def test_pytest_hook(in_process_results, case, param, fragments):
    _check(in_process_results[case], param, fragments)


@pytest.mark.parametrize("case,param,fragments", EXPECTED, ids=[e[0] for e in EXPECTED])
def test_env_var(env_var_results, case, param, fragments):
    assert env_var_results["instrumented"]
    result = env_var_results["cases"][case]
    if case.startswith("mha") and result["type"] == "ValueError":
        pytest.fail(
            "MultiheadFlexAttention is not checked with EQX_FLEXATTN_TYPECHECK=1: "
            "eqx_flexattn/__init__.py must import `nn` inside its `with _hook:` block."
        )
    _check(result, param, fragments)


def test_off_by_default():
    """Without the switch the library's own checks answer, with ValueErrors."""
    results = _subprocess_results("")
    assert not results["instrumented"]
    for case, _, _ in EXPECTED:
        assert results["cases"][case]["type"] == "ValueError", (case, results)


def test_error_tests_pass_without_type_checking():
    """The bad-input tests run with the jaxtyping hook on (pytest addopts), where the
    hook may answer first; here they run without it, so that the library's own
    messages are what they check."""
    env = {k: v for k, v in os.environ.items() if k != "EQX_FLEXATTN_TYPECHECK"}
    env["JAX_PLATFORMS"] = "cpu"
    files = ["test_attention.py", "test_block_mask.py", "test_mods.py"]
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
        + ["-o", "addopts=", "-k", "error or bad or validate or reject"]
        + [str(_TESTS / f) for f in files],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=_TESTS.parent,
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert " passed" in proc.stdout and "deselected" in proc.stdout
