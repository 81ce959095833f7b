"""The benchmark harness: `--quick` end to end, exact FLOP densities, torch parity."""

import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from helpers import full_profile

import eqx_flexattn as fa
from benchmarks import impls, mods, spec


REPO = Path(__file__).resolve().parent.parent
REQUIRED = (
    "impl",
    "case",
    "B",
    "Hq",
    "Hkv",
    "Lq",
    "Lkv",
    "D",
    "dtype",
    "fwd_ms",
    "fwdbwd_ms",
    "fwd_tflops",
    "fwdbwd_tflops",
    "compile_s",
    "device",
    "jax_version",
    "torch_version",
)
NUMBERS = ("fwd_ms", "fwdbwd_ms", "fwd_tflops", "fwdbwd_tflops", "compile_s")


def test_quick_run_writes_all_outputs(tmp_path):
    command = [sys.executable, "-m", "benchmarks.run", "--quick"]
    command += ["--out", str(tmp_path)]
    if not full_profile():  # every output and record kind, from fewer cases
        command += ["--cases", "causal,alibi+causal:learnable", "--mask-lengths", "256"]
    proc = subprocess.run(
        command,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    doc = json.loads((tmp_path / "latest.json").read_text())
    assert set(doc) == {"meta", "records", "skipped"}
    records = doc["records"]
    assert records
    for r in records:
        missing = [k for k in REQUIRED if k not in r]
        assert not missing, (missing, r)
        for k in NUMBERS:
            assert r[k] is None or (math.isfinite(r[k]) and r[k] > 0), (k, r)
    attention = [r for r in records if not r["case"].startswith("create_block_mask:")]
    assert any(r["impl"] == "eqx_flexattn.xla" and r["fwdbwd_ms"] for r in attention)
    assert all(r["fwd_ms"] and r["fwd_tflops"] for r in attention)
    assert any(
        r["case"] == "alibi+causal:learnable" and r["fwdbwd_ms"] for r in attention
    )
    assert any(r["impl"] == "eqx_flexattn.create_block_mask" for r in records)
    for s in doc["skipped"]:
        assert {"impl", "case", "config", "reason"} <= set(s)

    md = (tmp_path / "latest.md").read_text()
    assert "×torch" in md and "eqx_flexattn.xla" in md
    assert (tmp_path / "latest.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cpu_and_quick_runs_leave_the_committed_results_alone():
    from benchmarks import run

    committed = REPO / "benchmarks" / "results"
    assert run.parse_args(["--quick"]).out is None  # no fixed default
    for preset, platform in (("quick", "gpu"), ("full", "cpu"), ("quick", "cpu")):
        out = run.default_out(preset, platform)
        assert out != committed and out.is_relative_to(committed), (preset, platform)
        ignored = (REPO / ".gitignore").read_text().splitlines()
        assert f"{out.relative_to(REPO).as_posix()}/" in ignored
    assert run.default_out("gpu-session", "gpu") == committed
    assert run.parse_args(["--quick", "--out", "x"]).out == Path("x")


CHECKED_CONFIGS = [
    spec.CONFIGS["tiny"],
    spec.CONFIGS["tiny-decode"],
    spec.Config("odd", 1, 1, 1, 200, 200, 8, "float32"),
    spec.Config("decode-odd", 1, 1, 1, 7, 300, 8, "float32", backward=False),
]


@pytest.mark.parametrize("config", CHECKED_CONFIGS, ids=lambda c: c.name)
@pytest.mark.parametrize("case", list(spec.CASES.values()), ids=lambda c: c.name)
def test_density_is_exact(case, config):
    _, mask_mod = mods.eqx_mods(case, config)
    if mask_mod is None:
        expected = 1.0
    else:
        dense = np.asarray(fa.create_mask(mask_mod, None, None, config.Lq, config.Lkv))
        expected = dense.mean()
    assert spec.density(case, config) == pytest.approx(expected, rel=1e-12)


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize(
    "case", ["checkerboard", "alibi+causal", "document", "relative_bias:learnable"]
)
def test_torch_mods_match_eqx_mods(case):
    """The torch mods and eqx_flexattn's give the same attention (decode offsets)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("torch.nn.attention.flex_attention")
    case = spec.CASES[case]
    config = spec.Config("t", 1, 4, 2, 4, 256, 16, "float32", backward=False)
    ws = impls.Workspace(config)
    ours = np.asarray(impls.EqxFlex("reference").make_fwd(case, config, ws)())
    q, k, v, do = ws.jax_inputs()
    ws._cache[("torch", "cpu")] = tuple(
        torch.tensor(np.asarray(x)) for x in (q, k, v, do)
    )
    flex = impls.TorchFlex()
    flex.device = "cpu"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = flex.make_fwd(case, config, ws)().numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


@pytest.mark.parametrize("mask_bench", [True, False])
def test_time_budget_shares(mask_bench):
    """`--max-minutes` splits evenly between the configs and the mask benchmark; with
    `--no-mask-bench` the configs get all of it."""
    from benchmarks import run

    argv = ["--configs", "tiny,tiny-gqa", "--max-minutes", "1"]
    argv += [] if mask_bench else ["--no-mask-bench"]
    _, settings = run.make_settings(run.parse_args(argv))
    first, last_config, masks = settings.deadlines
    start = masks - 60.0
    expected = (20.0, 40.0, 60.0) if mask_bench else (30.0, 60.0, 60.0)
    got = (first - start, last_config - start, masks - start)
    np.testing.assert_allclose(got, expected, atol=1e-6)
