#!/usr/bin/env bash
# A GPU session's checks: the CUDA test tier per test file, then each benchmark file, then a short table.
#   bash bench/gpu_check.sh OUTDIR [tests|bench|all]
# Each step has its own time limit (seconds, overridable: T_<name>=...) and its own output, so a slow step costs
# only itself. OUTDIR gets run.log, bench_<name>.json and report.md (8 files at most, what the device tool returns);
# the CSV and the plot are made from the JSON afterwards: python bench/report.py OUTDIR/bench_*.json --out OUTDIR Runs from the repository root; the package needs no install (adapter_engine/kernels is linked).
# Limits learned on an H100 (2026-11-26): the first CUDA-tier run of a file compiles and autotunes its kernels.
set -u
out="${1:-bench/results/latest}"
part="${2:-all}"
mkdir -p "$out"
py="${PYTHON:-python}"
[ -e adapter_engine/kernels ] || ln -s ../kernels adapter_engine/kernels  # the package_dir mapping, uninstalled
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
"$py" -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"
t0=$(date +%s)
step() {  # step NAME DEFAULT_LIMIT COMMAND...
    local name=$1 limit=$2; shift 2
    local var="T_$name"; limit=${!var:-$limit}
    timeout "$limit" "$@" >> "$out/run.log" 2>&1
    echo "$name: exit $? after $(( $(date +%s) - t0 ))s (limit ${limit}s)" | tee -a "$out/run.log"
}
if [ "$part" != bench ]; then
    for t in merge:30 lora_linear:90 bottleneck:60 properties:60 patching:45 store:30 routing:30; do
        step "test_${t%%:*}" "${t##*:}" "$py" -m pytest -q -p no:cacheprovider -m cuda "tests/test_${t%%:*}.py" -rfE
    done
fi
if [ "$part" != tests ]; then
    for b in merge:40 merge_model:50 lora_linear:150 lora_model:60 bottleneck:90 serving:60; do
        step "bench_${b%%:*}" "${b##*:}" "$py" -m pytest -q -p no:cacheprovider "bench/bench_${b%%:*}.py" \
            --benchmark-json="$out/bench_${b%%:*}.json" --benchmark-columns=median,rounds
    done
    "$py" bench/report.py "$out"/bench_*.json --out "$out" > /dev/null && rm -f "$out/results.csv" "$out/ratios.png"
fi
grep -E "passed|failed|error|exit" "$out/run.log" | tail -n 30
[ -f "$out/report.md" ] && tail -n 40 "$out/report.md"
