"""Benchmark eqx_flexattn against torch FlexAttention and other attention kernels.

Usage (from the repository root)::

    python -m benchmarks.run --quick                   # tiny shapes, CPU, < 1 minute
    python -m benchmarks.run --preset gpu-session      # one H100, about 8 minutes
    python -m benchmarks.run                           # everything (preset "full")
    python -m benchmarks.run --configs seed,L8k --cases causal,document \\
        --impls 'eqx_flexattn.*,torch.*' --iters 50 --warmup 5 --out /tmp/bench
    python -m benchmarks.run --list                    # configs, cases, impls

For each config x case x implementation it times the forward pass and the forward
plus backward pass (median of up to `--iters` synchronised samples after `--warmup`
calls; see `benchmarks/timing.py`), records the first call's time (compilation included)
as `compile_s`, and times `create_block_mask` (causal and document masks) of
eqx_flexattn and torch. Everything runs in this one process on one device.

Implementations (`benchmarks/impls.py`): every eqx_flexattn backend in
`eqx_flexattn._backends.BACKENDS` (the dense "reference" on tiny shapes only),
`torch.compile(flex_attention)`, `jax.nn.dot_product_attention` (cudnn, xla),
JAX's Pallas `mha` and Hopper `attention_mgpu`, and tokamax (mosaic, triton) where
each can express the case; whatever cannot run is listed under `skipped` with why.
Configs and cases: `benchmarks/spec.py`; mods of each framework: `benchmarks/mods.py`.

Outputs in `--out`: `latest.json`
(`{"meta", "records", "skipped"}`, described in `benchmarks/report.py`),
`latest.md` (tables with each row's time relative to torch flex) and `latest.png`
(TFLOP/s per case and implementation). They are rewritten after every config, so an
interrupted run still leaves results. Without `--out`, a GPU run that is not
`--quick` writes `benchmarks/results` (the tables the README links); CPU and
`--quick` runs write `benchmarks/results/local`, which git ignores, so they never
replace the committed GPU results (pass `--out benchmarks/results` to insist).

A preset with `max_seconds` splits that time between its configs (`shares`); when a
config's share is spent its remaining measurements are skipped ("time budget").
`--max-minutes` overrides the total.
"""

from __future__ import annotations

import os


# JAX and torch share the GPU: JAX allocates on demand, up to half of the memory
# (its pool never shrinks), leaving the other half to torch. Both are overridable.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import fnmatch  # noqa: E402
import platform  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402


if __package__ in (None, ""):  # `python benchmarks/run.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import (  # noqa: E402
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

from benchmarks import impls as impls_lib, report, spec  # noqa: E402
from benchmarks.timing import (  # noqa: E402
    measure,
    MeasurementTimeout,
    time_limit,
    Timing,
    TimingSettings,
)


REPO = Path(__file__).resolve().parent.parent
RECORD_KEYS = (
    "impl",
    "case",
    "config",
    "B",
    "Hq",
    "Hkv",
    "Lq",
    "Lkv",
    "D",
    "dtype",
    "density",
    "fwd_ms",
    "fwdbwd_ms",
    "fwd_tflops",
    "fwdbwd_tflops",
    "compile_s",
    "compile_fwdbwd_s",
    "samples",
    "calls_per_sample",
    "device",
    "jax_version",
    "torch_version",
    "note",
)


RESULTS = REPO / "benchmarks" / "results"  # committed: the README links them
LOCAL_RESULTS = RESULTS / "local"  # in .gitignore


def default_out(preset_name: str, platform: str) -> Path:
    """Where results go without `--out`: the committed `benchmarks/results` only
    for a GPU run that is not `--quick`; CPU and quick runs go to the ignored
    `benchmarks/results/local`."""
    if preset_name == "quick" or platform not in ("gpu", "cuda", "rocm"):
        return LOCAL_RESULTS
    return RESULTS


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    csv = lambda s: [x.strip() for x in s.split(",") if x.strip()]
    p.add_argument("--preset", choices=sorted(spec.PRESETS), help="default: full")
    p.add_argument("--quick", action="store_true", help="same as --preset quick")
    p.add_argument(
        "--configs", type=csv, help=f"comma-separated, of {list(spec.CONFIGS)}"
    )
    p.add_argument("--cases", type=csv, help=f"comma-separated, of {list(spec.CASES)}")
    p.add_argument("--impls", type=csv, help="comma-separated names or globs (--list)")
    p.add_argument(
        "--out",
        type=Path,
        help=f"default: {RESULTS.relative_to(REPO)} for a GPU run that is not "
        f"--quick, else {LOCAL_RESULTS.relative_to(REPO)} (ignored by git)",
    )
    p.add_argument("--iters", type=int, help="timed samples per measurement (max)")
    p.add_argument("--warmup", type=int, help="untimed calls after the first")
    p.add_argument("--timed-seconds", type=float, help="stop timing after this")
    p.add_argument("--time-limit", type=float, help="seconds per measurement")
    p.add_argument("--max-minutes", type=float, help="total measuring time")
    p.add_argument("--mask-lengths", type=csv, help="create_block_mask lengths")
    p.add_argument("--no-mask-bench", action="store_true")
    p.add_argument(
        "--forward-only", action="store_true", help="time the forward pass only"
    )
    p.add_argument("--list", action="store_true", help="list and exit")
    return p.parse_args(argv)


@dataclasses.dataclass(frozen=True)
class Step:
    config: spec.Config
    cases: list[spec.Case]
    impls: tuple[str, ...] | None  # globs; None: every selected implementation


@dataclasses.dataclass
class Settings:
    timing: TimingSettings
    time_limit: float
    plan: list[Step]
    deadlines: list[float | None]  # one per plan step, then one for the masks
    mask_lengths: tuple[int, ...]
    forward_only: bool = False


def make_settings(args: argparse.Namespace) -> tuple[str, Settings]:
    """The preset, overridden by the command line."""
    name = args.preset or ("quick" if args.quick else "full")
    preset = spec.PRESETS[name]
    entries = list(preset.plan)
    if args.configs:
        spec.select(args.configs, spec.CONFIGS, "configs")
        default = {e.config: e for e in entries}
        entries = [default.get(c, spec.Entry(c, spec.ALL_CASES)) for c in args.configs]
    if args.cases:
        spec.select(args.cases, spec.CASES, "cases")
        entries = [dataclasses.replace(e, cases=tuple(args.cases)) for e in entries]
    if args.impls:  # the command line's choice replaces the preset's
        entries = [dataclasses.replace(e, impls=None) for e in entries]
    timing = TimingSettings(
        warmup=preset.warmup if args.warmup is None else args.warmup,
        iters=preset.iters if args.iters is None else args.iters,
        timed_seconds=args.timed_seconds or preset.timed_seconds,
    )
    total = preset.max_seconds
    if args.max_minutes is not None:
        total = 60.0 * args.max_minutes
    shares = preset.shares
    if shares is None or len(shares) != len(entries) + 1:
        shares = (1.0,) * (len(entries) + 1)
    if args.no_mask_bench:  # the masks' share goes to the configs
        shares = (*shares[:-1], 0.0)
    start = time.monotonic()
    cumulative, deadlines = 0.0, []
    for share in shares:
        cumulative += share / sum(shares)
        deadlines.append(None if total is None else start + total * cumulative)
    mask_lengths = preset.mask_lengths
    if args.mask_lengths:
        mask_lengths = tuple(int(x) for x in args.mask_lengths)
    if args.no_mask_bench:
        mask_lengths = ()
    plan = [
        Step(spec.CONFIGS[e.config], [spec.CASES[c] for c in e.cases], e.impls)
        for e in entries
    ]
    return name, Settings(
        timing=timing,
        time_limit=args.time_limit or preset.time_limit,
        plan=plan,
        deadlines=deadlines,
        mask_lengths=mask_lengths,
        forward_only=args.forward_only,
    )


def matching(impls: list, patterns) -> list:
    if not patterns:
        return list(impls)
    return [i for i in impls if any(fnmatch.fnmatch(i.name, p) for p in patterns)]


def select_impls(all_impls: list, patterns: list[str] | None) -> list:
    chosen = matching(all_impls, patterns)
    if not chosen:
        raise SystemExit(
            f"--impls {patterns} match none of {[i.name for i in all_impls]}"
        )
    return chosen


def _version(module: str) -> str | None:
    """The version of `module` if it is loaded (peers are imported by `unavailable`)."""
    return getattr(sys.modules.get(module), "__version__", None)


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") or None
    except Exception:  # noqa: BLE001
        return None


class Results:
    """Records, skipped entries and metadata; `as_dict` is the JSON document."""

    def __init__(self, meta: dict[str, Any]):
        self.meta = meta
        self.records: list[dict[str, Any]] = []
        self.skipped: list[dict[str, Any]] = []

    def record(self, **fields) -> dict[str, Any]:
        rec = {k: None for k in RECORD_KEYS}
        rec.update(
            device=self.meta["device"],
            jax_version=self.meta["jax_version"],
            torch_version=self.meta["torch_version"],
        )
        rec.update(fields)
        self.records.append(rec)
        return rec

    def skip(self, impl: str, case: str, config: str, reason: str, phase: str = "all"):
        self.skipped.append(
            dict(impl=impl, case=case, config=config, phase=phase, reason=reason)
        )

    def as_dict(self) -> dict[str, Any]:
        return dict(meta=self.meta, records=self.records, skipped=self.skipped)


def _error(e: BaseException) -> str:
    if isinstance(e, NotImplementedError):
        kind = "unsupported"
    elif isinstance(e, MeasurementTimeout):
        kind = "timeout"
    else:
        kind = f"failed: {type(e).__name__}"
    message = " ".join(str(e).split())
    return f"{kind}: {message[:400]}"


def timed(make, sync, settings: Settings, deadline: float | None, cleanup):
    """(Timing, None) or (None, reason): one measurement under the time limit."""
    limit = settings.time_limit
    if deadline is not None:
        limit = min(limit, max(10.0, deadline - time.monotonic() + 30.0))
    step = None
    try:
        with time_limit(limit):
            step = make()
            return measure(step, sync, settings.timing), None
    except Exception as e:  # noqa: BLE001 -- every failure is recorded, never fatal
        return None, _error(e)
    finally:
        del step
        cleanup()


def tflops(flop: float, t: Timing | None) -> float | None:
    return None if t is None or flop == 0 else flop / (t.median_ms * 1e-3) / 1e12


def run_case(impl, case, config, ws, settings, deadline, results: Results) -> str:
    """Measure fwd and fwd+bwd of one (impl, case, config); returns a status line."""
    fwd, error = timed(
        lambda: impl.make_fwd(case, config, ws),
        impl.sync,
        settings,
        deadline,
        impl.cleanup,
    )
    if fwd is None:
        results.skip(impl.name, case.name, config.name, error)
        return error
    bwd, note = None, None
    if config.backward and not settings.forward_only:
        note = impl.backward_problem(case, config)
        if note is None:
            bwd, error = timed(
                lambda: impl.make_fwdbwd(case, config, ws),
                impl.sync,
                settings,
                deadline,
                impl.cleanup,
            )
            note = None if bwd is not None else f"fwd+bwd {error}"
        if note:
            results.skip(impl.name, case.name, config.name, note, phase="fwdbwd")
    flop_fwd, flop_bwd = spec.flops(case, config)
    results.record(
        impl=impl.name,
        case=case.name,
        config=config.name,
        **config.shape_fields(),
        density=spec.density(case, config),
        fwd_ms=fwd.median_ms,
        fwdbwd_ms=None if bwd is None else bwd.median_ms,
        fwd_tflops=tflops(flop_fwd, fwd),
        fwdbwd_tflops=tflops(flop_bwd, bwd),
        compile_s=fwd.first_call_s,
        compile_fwdbwd_s=None if bwd is None else bwd.first_call_s,
        samples=fwd.samples,
        calls_per_sample=fwd.calls_per_sample,
        note=note,
    )
    line = f"fwd {fwd.median_ms:.3f} ms"
    if bwd is not None:
        line += f", fwd+bwd {bwd.median_ms:.3f} ms"
    return line + (f" ({note})" if note else "")


def run_config(
    config, cases, impls, unavailable, settings, deadline, results, progress, task
):
    ws = impls_lib.Workspace(config)
    try:
        for impl in impls:
            for case in cases:
                label = f"{config.name} / {case.name} / {impl.name}"
                progress.update(task, description=label)
                reason = (
                    unavailable[impl.name]
                    or spec.case_problem(case, config)
                    or impl.supports(case, config)
                )
                if (
                    reason is None
                    and deadline is not None
                    and time.monotonic() > deadline
                ):
                    reason = "time budget of the preset spent"
                if reason is not None:
                    results.skip(impl.name, case.name, config.name, reason)
                else:
                    status = run_case(
                        impl, case, config, ws, settings, deadline, results
                    )
                    progress.console.print(
                        f"{label}: {status}", highlight=False, markup=False
                    )
                progress.advance(task)
    finally:
        ws.close()


def run_mask_bench(settings, results, progress, task, deadline, torch_ok: bool):
    """create_block_mask timings: causal and document masks at each length."""
    builders = impls_lib.mask_builders(with_torch=torch_ok)
    for length in settings.mask_lengths:
        for mask in ("causal", "document"):
            for name, (make, sync) in builders.items():
                case = f"{report.MASK_CASE_PREFIX}{mask}"
                config = f"mask-L{length}"
                label = f"{case} L={length} / {name}"
                progress.update(task, description=label)
                progress.advance(task)
                if deadline is not None and time.monotonic() > deadline:
                    results.skip(name, case, config, "time budget of the preset spent")
                    continue
                t, error = timed(
                    lambda: make(mask, length), sync, settings, deadline, lambda: None
                )
                if t is None:
                    results.skip(name, case, config, error)
                    status = error
                else:
                    results.record(
                        impl=name,
                        case=case,
                        config=config,
                        B=1,
                        Hq=1,
                        Hkv=1,
                        Lq=length,
                        Lkv=length,
                        fwd_ms=t.median_ms,
                        compile_s=t.first_call_s,
                        samples=t.samples,
                        calls_per_sample=t.calls_per_sample,
                    )
                    status = f"{t.median_ms:.3f} ms"
                progress.console.print(
                    f"{label}: {status}", highlight=False, markup=False
                )


def list_everything(console: Console) -> None:
    console = Console(markup=False, highlight=False)
    console.print("configs:")
    for c in spec.CONFIGS.values():
        console.print(f"  {c.name}: {report._shape(dataclasses.asdict(c))}")
    console.print("cases: " + ", ".join(spec.CASES))
    console.print("impls: " + ", ".join(i.name for i in impls_lib.registry()))
    for name, p in spec.PRESETS.items():
        console.print(f"preset {name}:")
        for e in p.plan:
            who = "all impls" if e.impls is None else ", ".join(e.impls)
            console.print(f"  {e.config}: {', '.join(e.cases)} ({who})")


def build_meta(argv, preset_name: str, settings: Settings, env, unavailable) -> dict:
    import eqx_flexattn
    from eqx_flexattn._backends import BACKENDS

    meta = dict(
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"
        ),
        command=" ".join(
            ["python -m benchmarks.run", *(argv if argv is not None else sys.argv[1:])]
        ),
        preset=preset_name,
        device=env.device,
        platform=env.platform,
        python=platform.python_version(),
        jax_version=jax.__version__,
        torch_version=_version("torch"),
        tokamax_version=_version("tokamax"),
        eqx_flexattn_version=eqx_flexattn.__version__,
        git_commit=_git_commit(),
        eqx_flexattn_backends=list(BACKENDS),
        impls={name: reason or "available" for name, reason in unavailable.items()},
        iters=settings.timing.iters,
        warmup=settings.timing.warmup,
        timed_seconds=settings.timing.timed_seconds,
        time_limit_s=settings.time_limit,
        sample_ms=settings.timing.sample_ms,
        timing=(
            "median over up to `iters` samples (fewer, >= 3, once `timed_seconds` "
            "are spent) after the first call and `warmup` calls; a sample is "
            "`calls_per_sample` back-to-back calls then one device sync "
            "(jax.block_until_ready / torch.cuda.synchronize), divided by that "
            "number, chosen so a sample lasts about `sample_ms` "
            "(benchmarks/timing.py)"
        ),
        flops=(
            "fwd = 4 B Hq Lq Lkv D density, fwd+bwd = 3.5 fwd; density = attended "
            "(query, key) pairs / (Lq Lkv), exact (closed form per mask, "
            "benchmarks/spec.py)"
        ),
        notes=impls_lib.NOTES,
    )
    return meta


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _run_plan(settings, impls, unavailable, results, console, n_tasks, torch_ok, out):
    """Every step of the plan, then the mask benchmark; results are written to
    `--out` after each config."""
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        task = progress.add_task("benchmarks", total=n_tasks)
        for step, deadline in zip(settings.plan, settings.deadlines):
            run_config(
                step.config,
                step.cases,
                matching(impls, step.impls),
                unavailable,
                settings,
                deadline,
                results,
                progress,
                task,
            )
            report.write_all(results.as_dict(), out)
        if settings.mask_lengths:
            run_mask_bench(
                settings, results, progress, task, settings.deadlines[-1], torch_ok
            )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console()
    if not console.is_terminal:  # logs: wide enough for the tables
        console = Console(width=max(console.width, 200))
    if args.list:
        list_everything(console)
        return 0
    preset_name, settings = make_settings(args)
    env = impls_lib.detect_env(quick=preset_name == "quick")
    impls = select_impls(impls_lib.registry(), args.impls)
    unavailable = {i.name: i.unavailable(env) for i in impls}
    meta = build_meta(argv, preset_name, settings, env, unavailable)
    out = args.out or default_out(preset_name, env.platform)
    results = Results(meta)
    torch_ok = any(
        i.name == report.TORCH and unavailable[i.name] is None for i in impls
    )
    n_tasks = sum(len(matching(impls, s.impls)) * len(s.cases) for s in settings.plan)
    n_tasks += len(settings.mask_lengths) * 2 * (2 if torch_ok else 1)
    console.print(
        f"preset {preset_name} on {env.device} ({env.platform}); impls: "
        + ", ".join(
            f"{n}" + ("" if r is None else " (unavailable)")
            for n, r in unavailable.items()
        ),
        highlight=False,
        markup=False,
    )
    started = time.monotonic()
    signal.signal(signal.SIGTERM, _interrupt)  # `timeout`: keep what was measured
    try:
        _run_plan(
            settings, impls, unavailable, results, console, n_tasks, torch_ok, out
        )
    except KeyboardInterrupt:
        meta.setdefault("notes", []).append("interrupted: the results measured so far")
    meta["elapsed_s"] = round(time.monotonic() - started, 1)
    paths = report.write_all(results.as_dict(), out)
    report.print_tables(results.as_dict(), console)
    console.print(
        f"{len(results.records)} records, {len(results.skipped)} skipped, "
        f"{meta['elapsed_s']} s; wrote " + ", ".join(map(str, paths)),
        highlight=False,
        markup=False,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
