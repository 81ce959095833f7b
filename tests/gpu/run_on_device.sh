#!/usr/bin/env bash
# Runs tests/gpu on the GPU machine, output tee'd to $OUT/gpu_tests.log.
# That machine has jax, equinox, jaxtyping, pytest and hypothesis but neither beartype
# nor nbmake, and installs nothing: `-o addopts=''` drops pyproject's
# `--nbmake --jaxtyping-packages=...`.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-.}"
mkdir -p "$OUT"
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" python3 -m pytest tests/gpu -q \
    -o addopts='' -p no:cacheprovider "$@" 2>&1 | tee "$OUT/gpu_tests.log"
exit "${PIPESTATUS[0]}"
