#!/usr/bin/env bash
# One GPU session's worth of checks: the CUDA test tier, then each benchmark file, then a short table.
#   bash bench/gpu_check.sh OUTDIR
# Each step has its own time limit and writes its own file, so a slow step costs only itself.
# Runs from the repository root with the package importable (pip install -e . --no-deps, or PYTHONPATH).
set -uo pipefail
out="${1:-bench/results/latest}"
mkdir -p "$out"
py="${PYTHON:-python}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
"$py" -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"

# 1. CUDA tier (bf16, large shapes).
timeout "${CUDA_TESTS_TIMEOUT:-200}" "$py" -m pytest -q -p no:cacheprovider -m cuda tests \
    > "$out/cuda_tests.log" 2>&1
tail -n 15 "$out/cuda_tests.log"

# 2. Benchmarks, one pytest run (one JSON) per file; ratios are computed within a file.
for bench in ${BENCHES:-merge merge_model lora_linear bottleneck serving}; do
    [ -f "bench/bench_$bench.py" ] || continue
    timeout "${BENCH_TIMEOUT:-150}" "$py" -m pytest -q -p no:cacheprovider "bench/bench_$bench.py" \
        --benchmark-json="$out/bench_$bench.json" --benchmark-columns=median,rounds >> "$out/bench.log" 2>&1
    echo "bench_$bench: exit $?"
done

# 3. The short table, last.
"$py" bench/report.py "$out"/bench_*.json --out "$out"
