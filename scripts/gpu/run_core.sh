#!/usr/bin/env bash
# On the GPU machine, from the repo root: build kvcached as a user would (no network:
# --no-build-isolation, build tools from the image), then run the gpu-marked tests
# and the VMM benchmark. Logs and JSON go to $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -m pip install -q --no-build-isolation --no-deps . 2>&1 | tail -3
python3 -c "import kvcached._vmm as v; print('backends:', v.backend_status())"
cd /tmp  # import the installed package, not the source tree
python3 -m pytest -q -p no:cacheprovider -m gpu "$OLDPWD/tests/gpu" "$OLDPWD/tests/pool/test_gpu.py" 2>&1 | tee "$OUT/gpu_tests.log" | tail -15
python3 "$OLDPWD/tests/gpu/vmm_scenarios.py" raw_driver_floor 2>&1 | tee "$OUT/floor.txt"
python3 "$OLDPWD/scripts/bench_vmm.py" --device cuda --iterations 200 --json "$OUT/bench_vmm.json" 2>&1 | tee "$OUT/bench_vmm.txt"
