#!/usr/bin/env bash
# GPU checks of tierflow, in one go on a lent GPU machine (budget <= 7 min on an H100):
#   (a) the CUDA tests: every test of tests/test_cuda*.py and the test_cuda* tests of the
#       other files that skip without CUDA (pytest -k cuda), then tests/cuda_activations_smoke.py;
#   (b) `tierflow bench gpu`: the 0.94 B Llama of the NaN report, bf16, batch 4x1024, 20 steps,
#       tierflow (host budget; NVMe) against plain PyTorch on the same weights and batches;
#   (c) a summary table, printed and written to $OUT/gpu-check-summary.txt when OUT is set
#       (with the pytest log, JUnit XML and the 1 B run's JSON and table beside it).
#
#   bash bench/gpu_check.sh               # on the GPU machine, from anywhere
#   bash bench/gpu_check.sh --cpu-smoke   # dry run on a CPU machine, tiny sizes (< 1 min);
#                                         # GPU_CHECK_CPU_SMOKE=1 does the same
#
# Every part runs even if an earlier one failed; the exit status is 1 if any part failed.
# The limits (30 + 180 + 60 + 300 s) add up to less than the device tool's 600 s per call,
# so even a run where every part hangs returns its logs.
# Each part has a wall-clock limit (coreutils timeout, SIGINT so the 1 B run still writes
# what it measured); PYTEST_LIMIT_S / BENCH_LIMIT_S override them. The GPU machine has no
# pytest-timeout, so pytest runs with `-p no:timeout` here as everywhere (the ini's
# `timeout = 300` then only draws an "Unknown config option" warning) and the limit is ours.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-$(command -v python || command -v python3)}
SMOKE=${GPU_CHECK_CPU_SMOKE:-0}
[[ "${1:-}" == "--cpu-smoke" ]] && SMOKE=1
LOGS=${OUT:-$(mktemp -d /tmp/tierflow-gpu-check-XXXXXX)}
mkdir -p "$LOGS"
SUMMARY="$LOGS/gpu-check-summary.txt"
PYTEST_LIMIT_S=${PYTEST_LIMIT_S:-180}
BENCH_LIMIT_S=${BENCH_LIMIT_S:-300}

RESULTS=()   # "status|seconds|part" per part, for the table
FAILED=0

# run_part NAME LIMIT_S COMMAND...: run it under the limit, tee its output to the log, record PASS/FAIL.
run_part() {
    local name=$1 limit=$2 start rc
    shift 2
    echo "=== $name (limit ${limit} s): $*"
    start=$(date +%s)
    timeout --signal=INT --kill-after=30 "$limit" "$@" 2>&1 | tee -a "$LOGS/gpu-check.log"
    rc=${PIPESTATUS[0]}
    local status=PASS
    if [[ $rc -ne 0 ]]; then
        status="FAIL (exit $rc$([[ $rc -eq 124 ]] && echo ", timed out"))"
        FAILED=1
    fi
    RESULTS+=("$status|$(( $(date +%s) - start ))|$name")
}

# GPU_CHECK_BENCH_ARGS: extra flags of `tierflow bench gpu`, e.g. "--fault nan" to see the check fail.
read -r -a EXTRA_BENCH_ARGS <<< "${GPU_CHECK_BENCH_ARGS:-}"
if [[ $SMOKE == 1 ]]; then
    BENCH_ARGS=(--cpu-smoke)
    CUDA_CHECK="import torch; print('CPU smoke run: CUDA not required, available:', torch.cuda.is_available())"
else
    BENCH_ARGS=()
    CUDA_CHECK="import torch, sys; ok = torch.cuda.is_available(); print('CUDA:', ok and torch.cuda.get_device_name(), 'torch', torch.__version__); sys.exit(0 if ok else 1)"
fi

# (0) without CUDA every GPU test would be skipped and "pass": that is a failure here.
run_part "CUDA available" 30 "$PY" -c "$CUDA_CHECK"

# (a) CUDA tests. On the CPU they are collected and skipped: it checks that they import.
mapfile -t CUDA_FILES < <(grep -l "not torch.cuda.is_available()" tests/test_*.py)
run_part "pytest -k cuda ${CUDA_FILES[*]}" "$PYTEST_LIMIT_S" \
    "$PY" -m pytest -q -p no:timeout -rfEs --durations=10 --junitxml="$LOGS/pytest-cuda.xml" -k cuda "${CUDA_FILES[@]}"
if [[ $SMOKE != 1 ]]; then
    run_part "tests/cuda_activations_smoke.py" 60 "$PY" tests/cuda_activations_smoke.py
fi

# (b) the 1 B run (tiny and on the CPU with --cpu-smoke).
BENCH_ARGS+=("${EXTRA_BENCH_ARGS[@]}")
run_part "tierflow bench gpu ${BENCH_ARGS[*]}" "$BENCH_LIMIT_S" \
    "$PY" -m tierflow bench gpu "${BENCH_ARGS[@]}" --json "$LOGS/gpu-check-1b.json" --summary "$LOGS/gpu-check-1b.txt"

# (c) the summary.
{
    echo
    echo "=== tierflow GPU check summary ($(date -u +%Y-%m-%dT%H:%M:%SZ), $(git rev-parse --short HEAD 2>/dev/null || echo no-git)$([[ $SMOKE == 1 ]] && echo ', CPU SMOKE RUN: nothing ran on a GPU'))"
    printf '%-24s %8s  %s\n' status seconds part
    for r in "${RESULTS[@]}"; do
        IFS='|' read -r status seconds part <<< "$r"
        printf '%-24s %8s  %s\n' "$status" "$seconds" "$part"
    done
    echo
    [[ -f "$LOGS/gpu-check-1b.txt" ]] && cat "$LOGS/gpu-check-1b.txt"
    echo
    echo "OVERALL: $([[ $FAILED == 0 ]] && echo PASS || echo FAIL)   (logs: $LOGS)"
} | tee "$SUMMARY"
exit $FAILED
