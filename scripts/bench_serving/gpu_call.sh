#!/usr/bin/env bash
# One device call of the serving benchmark, from the repo root on the GPU machine:
# stage vLLM 0.26 (the pieces this call carries; see scripts/gpu/README.md), install
# kvcached from this tree when its sources changed, write the 8B-shaped model, then
# run.py with the given arguments. Results and server logs go to $OUT.
#
#   bash scripts/bench_serving/gpu_call.sh overhead
#   bash scripts/bench_serving/gpu_call.sh multi --config static
#   bash scripts/bench_serving/gpu_call.sh multi --config kvcached
#   STAGE=0 bash scripts/bench_serving/gpu_call.sh prepare   # build and model only (no run)
#
# Env: MODEL (/tmp/llama8b), KVCACHED_COMMIT (recorded in the JSON: write the hash in the
# command as sent from here; `git rev-parse` on the device reads the copy's git metadata,
# which can lag the tree: 63fad2a's runs recorded 616f1e8), STAGE=0 to skip staging.
set -uo pipefail
ROOT=$(pwd)
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
MODEL=${MODEL:-/tmp/llama8b}
export PYTHONUNBUFFERED=1
t0=$(date +%s)
if [ "${STAGE:-1}" = 1 ]; then
    bash scripts/gpu/stage_vllm.sh --require || exit 3
fi
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1
src_id=$(find kvcached kvctl csrc CMakeLists.txt pyproject.toml -type f -not -path '*/__pycache__/*' -not -path 'kvcached/integrations/sglang/*' | sort | xargs cat | sha256sum | cut -c1-16)
if [ "$(cat /tmp/kvcached.id 2>/dev/null)" != "$src_id" ]; then
    python3 -m pip install -q --no-build-isolation --no-deps . 2>&1 | tail -3
    # kvcached.control too: its posix_ipc comes with the payload, not the image (a lease
    # once lost its engine runs to a ModuleNotFoundError raised minutes into start-up)
    (cd /tmp && python3 -c "import kvcached._vmm as v, kvcached.control; print('kvcached backends:', v.backend_status())") || exit 1
    echo "$src_id" > /tmp/kvcached.id
fi
[ -f "$MODEL/config.json" ] || python3 scripts/gpu/make_model.py "$MODEL" || exit 1
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv,noheader
echo "gpu_call: ready after $(( $(date +%s) - t0 )) s"
[ "${1:-}" = prepare ] && exit 0
mkdir -p /tmp/kvbench && cd /tmp/kvbench  # engines must import the installed kvcached, not $ROOT/kvcached
python3 "$ROOT/scripts/bench_serving/run.py" "$@" --model "$MODEL" --out "$OUT" \
    --deadline-s "$(( ${CALL_LIMIT_S:-585} - ($(date +%s) - t0) ))"
rc=$?
(cd "$OUT" && ls server_*.log >/dev/null 2>&1 && tar czf "logs_$(date +%H%M%S).tgz" server_*.log && rm -f server_*.log)
echo "gpu_call: rc=$rc after $(( $(date +%s) - t0 )) s"
exit $rc
