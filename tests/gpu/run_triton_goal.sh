#!/usr/bin/env bash
# The triton backend on the GPU machine, in one command (at most 10 minutes on an
# H100/H200): its GPU tests (against xla in float32 and torch FlexAttention), then
# the `triton` benchmark preset beside torch flex (seed and L8k in half precision,
# learnable parameters, float32 at TF32 / 3xTF32 / IEEE). Writes to $OUT:
# triton_gpu_tests.log, triton_bench.log and latest.{json,md,png}.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-.}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,compute_cap,memory.total --format=csv 2>&1 | tee "$OUT/triton_gpu_tests.log"
timeout "${TEST_SECONDS:-240}" python3 -m pytest tests/gpu/test_triton_gpu.py -v -rfE \
    --tb=short -o addopts='' -p no:cacheprovider --durations=8 -W ignore::DeprecationWarning 2>&1 | tee -a "$OUT/triton_gpu_tests.log"
timeout "${BENCH_SECONDS:-345}" python3 -m benchmarks.run --preset triton \
    --max-minutes "${BENCH_MINUTES:-4.5}" --out "$OUT" 2>&1 | tail -n 200 > "$OUT/triton_bench.log"
tail -n 5 "$OUT/triton_bench.log"
