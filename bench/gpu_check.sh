#!/usr/bin/env bash
# One GPU session's worth of checks: the CUDA test tier, then every benchmark, then a short table.
#   bash bench/gpu_check.sh OUTDIR        (OUTDIR gets cuda_tests.log, bench.json, bench.log, report.md, ...)
# Runs from the repository root with the package importable (pip install -e . --no-deps, or PYTHONPATH).
set -uo pipefail
out="${1:-bench/results/latest}"
mkdir -p "$out"
py="${PYTHON:-python}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
"$py" -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"

# 1. CUDA tier (bf16, large shapes).
timeout "${CUDA_TESTS_TIMEOUT:-240}" "$py" -m pytest -q -p no:cacheprovider -m cuda tests -x \
    2>&1 | tee "$out/cuda_tests.log" || true
# 2. Benchmarks (full sizes on a GPU), JSON for the report.
timeout "${BENCH_TIMEOUT:-300}" "$py" -m pytest -q -p no:cacheprovider bench ${BENCH_FILTER:+-k "$BENCH_FILTER"} \
    --benchmark-json="$out/bench.json" --benchmark-columns=median,rounds 2>&1 | tee "$out/bench.log" | tail -n 40 || true
# 3. The short table, last.
if [ -s "$out/bench.json" ]; then "$py" bench/report.py "$out/bench.json" --out "$out"; fi
tail -n 3 "$out/cuda_tests.log"
