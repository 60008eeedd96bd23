#!/usr/bin/env bash
# One GPU session's checks in one call of the device tool (which copies the working tree and
# the carried `.whl/` folder of wheels, see ../shared/MACHINE-NOTES.md):
#   (0) install the carried wheels (DeepSpeed and its pure-Python dependencies) into /tmp/site and
#       start building DeepSpeed's CPU Adam in the background (about a minute);
#   (1) the CUDA tests (`pytest -k cuda` over the files that skip without CUDA), PYTEST_LIMIT_S;
#       PYTEST_K and PYTEST_ONLY (files) narrow them;
#   (2) `tierflow bench throughput`: torch, tierflow, DeepSpeed ZeRO-3 CPU offload, FSDP2 offload
#       on the 0.94 B Llama, batch 4x1024 (TP_ARGS adds or overrides flags), each contender
#       within TP_TIMEOUT_S; tierflow's timeline and profiler table in $OUT/profile;
#   (3) with TP2_ARGS, a second `tierflow bench throughput` with those flags (e.g. a larger batch);
#   (4) with EXTRA_BENCH (e.g. "moe --device cuda --device-memory 1GiB --host-memory 512MiB" or
#       "quant --what speed --device cuda --placements nvme"), `tierflow bench $EXTRA_BENCH`
#       within EXTRA_LIMIT_S.
#   bash bench/gpu_session.sh            # on the GPU machine; SKIP_TESTS=1 skips (1)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d /tmp/tierflow-gpu-XXXXXX)}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-$(command -v python || command -v python3)}
START=$(date +%s)
stamp() { echo "=== [$(( $(date +%s) - START )) s] $*"; }

stamp "machine"
nvidia-smi --query-gpu=name,memory.total,pcie.link.gen.current,pcie.link.width.current --format=csv 2>&1 | tail -2
nproc; free -g | head -2
if [[ -d .whl ]]; then
    stamp "installing carried wheels"
    pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | tail -2
    (DS_BUILD_OPS=0 "$PY" -c "from deepspeed.ops.op_builder import CPUAdamBuilder; CPUAdamBuilder().load()" \
        > "$OUT/deepspeed-build.log" 2>&1 &)
fi
if [[ ${SKIP_TESTS:-0} != 1 ]]; then
    stamp "CUDA tests"
    mapfile -t CUDA_FILES < <(grep -l "not torch.cuda.is_available()" tests/test_*.py)
    read -r -a PYTEST_FILES <<< "${PYTEST_ONLY:-}"   # PYTEST_ONLY: these files instead
    timeout --signal=INT --kill-after=20 "${PYTEST_LIMIT_S:-150}" "$PY" -m pytest -q -p no:timeout -rfEs \
        --durations=8 --junitxml="$OUT/pytest-cuda.xml" -k "${PYTEST_K:-cuda}" "${PYTEST_FILES[@]:-${CUDA_FILES[@]}}" 2>&1 | tail -40
    echo "pytest exit: ${PIPESTATUS[0]}"
fi
stamp "throughput"
read -r -a TP_EXTRA <<< "${TP_ARGS:-}"
timeout --signal=INT --kill-after=20 "${TP_LIMIT_S:-400}" "$PY" -m tierflow bench throughput \
    --timeout "${TP_TIMEOUT_S:-150}" --profile-dir "$OUT/profile" --json "$OUT/throughput.json" "${TP_EXTRA[@]}" 2>&1 \
    | grep -v -E "^\s*$|Warning|warn\(" | tail -60
if [[ -n "${TP2_ARGS:-}" ]]; then
    stamp "throughput (second configuration)"
    read -r -a TP2_EXTRA <<< "$TP2_ARGS"
    timeout --signal=INT --kill-after=20 "${TP2_LIMIT_S:-200}" "$PY" -m tierflow bench throughput \
        --timeout "${TP_TIMEOUT_S:-150}" --json "$OUT/throughput-2.json" "${TP2_EXTRA[@]}" 2>&1 \
        | grep -v -E "^\s*$|Warning|warn\(" | tail -30
fi
if [[ -n "${EXTRA_BENCH:-}" ]]; then
    stamp "tierflow bench $EXTRA_BENCH"
    read -r -a EXTRA <<< "$EXTRA_BENCH"
    timeout --signal=INT --kill-after=20 "${EXTRA_LIMIT_S:-200}" "$PY" -m tierflow bench "${EXTRA[@]}" \
        --json "$OUT/extra.json" 2>&1 | grep -v -E "^\s*$|Warning|warn\(" | tail -30
fi
stamp "done"
tail -3 "$OUT/deepspeed-build.log" 2>/dev/null
