"""Times a kernel backend under several kernel options (one GPU run).

    python -m benchmarks.tune [--backend mosaic|triton] [--fwdbwd] [--torch]
        [--configs seed,L8k] [--cases none,causal]
        [--variants '[{}, {"num_stages": 3}]'] [--label new]

Prints one line per (config, case, options): median ms and TFLOP/s on the attended
fraction, built and timed like the harness (`benchmarks.impls`, `benchmarks.timing`).
Run it twice with different `PYTHONPATH`s to compare two versions of the kernels
in one GPU session. `--torch` adds torch FlexAttention's row for each case, timed
the same way in the same process.
"""

from __future__ import annotations

import argparse
import json

import jax

from benchmarks import spec
from benchmarks.impls import (
    _jitted,
    _vjp_step,
    detect_env,
    EqxFlex,
    TorchFlex,
    Workspace,
)
from benchmarks.timing import measure, TimingSettings


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", default="mosaic", choices=("mosaic", "triton"))
    parser.add_argument("--fwdbwd", action="store_true", help="time forward+backward")
    parser.add_argument("--torch", action="store_true", help="also time torch flex")
    parser.add_argument("--configs", default="seed,L8k")
    parser.add_argument("--cases", default="none,causal,softcap+causal,document")
    parser.add_argument("--variants", default="[{}]", help="JSON list of options")
    parser.add_argument("--label", default="")
    parser.add_argument(
        "--grads",
        default="qkv",
        choices=("qkv", "q", "kv"),
        help="with --fwdbwd: the inputs differentiated (q: the dQ kernel only, "
        "kv: the dK/dV kernel only)",
    )
    args = parser.parse_args()
    settings = TimingSettings(warmup=2, iters=20, timed_seconds=1.0)
    variants = json.loads(args.variants)
    mode = "fwd+bwd" if args.fwdbwd else "fwd"
    print(jax.devices()[0].device_kind, args.label, mode, flush=True)
    torch_impls = [TorchFlex(), TorchFlex(tf32=True)] if args.torch else []
    for t in torch_impls:
        if why := t.unavailable(detect_env(quick=False)):
            raise SystemExit(f"--torch: {why}")
    for cname in args.configs.split(","):
        config = spec.CONFIGS[cname]
        ws = Workspace(config)
        for case_name in args.cases.split(","):
            case = spec.CASES[case_name]
            flop = spec.flops(case, config)[1 if args.fwdbwd else 0]
            impls = [
                (str(o), EqxFlex(args.backend, kernel_options={args.backend: o}))
                for o in variants
            ]
            if args.torch:
                impls += [
                    (t.name, t) for t in torch_impls if not t.supports(case, config)
                ]
            for label, impl in impls:
                head = f"{args.label:6s} {mode:7s} {cname:5s} {case_name:22s}"
                head += f" {label:28s}"
                try:
                    if impl.framework == "torch":
                        make = impl.make_fwdbwd if args.fwdbwd else impl.make_fwd
                        step = make(case, config, ws)
                    elif not args.fwdbwd:
                        step = impl.make_fwd(case, config, ws)
                    elif args.grads == "qkv":
                        step = impl.make_fwdbwd(case, config, ws)
                    else:
                        step = _partial_fwdbwd(impl, case, config, ws, args.grads)
                    t = measure(step, impl.sync, settings)
                    tflops = flop / t.median_ms / 1e9
                    ms = t.median_ms
                    print(f"{head} {ms:8.3f} ms {tflops:6.0f} TFLOP/s", flush=True)
                except Exception as e:  # noqa: BLE001
                    print(f"{head} FAIL {type(e).__name__}: {str(e)[:300]}", flush=True)


def _partial_fwdbwd(impl, case, config, ws, grads: str):
    """Forward + the backward of `grads` ("q" or "kv") only."""
    fn, params = impl.attention(case, config)
    q, k, v, do = ws.jax_inputs(impl.layout)
    argnums = (0,) if grads == "q" else (1, 2)
    return _jitted(_vjp_step(fn, False, argnums), params, q, k, v, do)


if __name__ == "__main__":
    main()
