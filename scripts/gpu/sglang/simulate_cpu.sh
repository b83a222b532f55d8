#!/usr/bin/env bash
# Rehearse the SGLang 0.5.17 staging on this CPU-only machine, as far as it goes without a
# GPU. Needs .stage-sglang/ (prepare_stage.sh) and the image-like Python 3.12 venv that
# scripts/gpu/simulate_cpu.sh builds (torch 2.11.0 + its cu130 wheels, transformers 5.17.0,
# tokenizers 0.23.2, ...; $SIM/venv312) with its stub libcuda.so.1 ($SIM/stub).
#
#   bash scripts/gpu/sglang/simulate_cpu.sh
#
# 1. stage_sglang.sh run twice, from two scratch roots that hold only .stage-sglang/part1,
#    then only part2 (as the chained device calls will); the second installs into
#    $SIM/site-sglang and runs check_sglang_imports.py (as on a 9.0 GPU: SGLang's
#    is_cuda() imports, FlashInfer's included, and sgl_kernel's sm90 ops).
# 2. `python -m sglang.launch_server` of the tiny model with the flags the GPU check
#    uses, plain and with ENABLE_KVCACHED=true, runs the real start-up path (arguments,
#    model config, tokenizer, the scheduler process) until the model runner needs a
#    device. Pass = both stop there, with no missing module on the way.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../../.." && pwd)
SIM=${SIM:-/tmp/kvsim}
P=$SIM/venv312/bin/python
[ -x "$P" ] && [ -f "$SIM/stub/libcuda.so.1" ] || { echo "run scripts/gpu/simulate_cpu.sh first (needs $P, $SIM/stub)" >&2; exit 1; }
# FlashInfer (imported on CUDA, which check_sglang_imports.py pretends) needs pynvml: the
# image has nvidia-ml-py, the venv may not.
"$P" -c "import pynvml" 2>/dev/null || "$P" -m pip install -q nvidia-ml-py

echo "== stage_sglang.sh, one piece per call"
rm -rf "$SIM/kvstage-sglang" "$SIM/site-sglang"
n=0
for part in "$ROOT"/.stage-sglang/part*; do
    n=$((n + 1))
    r=$SIM/sgroot$n
    rm -rf "$r" && mkdir -p "$r/.stage-sglang" "$r/scripts/gpu"
    ln -s "$part" "$r/.stage-sglang/$(basename "$part")"
    ln -s "$HERE" "$r/scripts/gpu/sglang"
    (cd "$r" && LD_LIBRARY_PATH=$SIM/stub PYTHON=$P KVSTAGE=$SIM/kvstage-sglang SITE=$SIM/site-sglang \
        bash scripts/gpu/sglang/stage_sglang.sh) 2>&1 | grep -E "^(stage|no GPU|sglang |MISSING|ERROR|[0-9]+/)"
done

[ -d "$SIM/llama-tiny" ] || "$P" "$ROOT/scripts/gpu/make_model.py" "$SIM/llama-tiny" --tiny
echo "== kvcached for Python 3.12 (its pure-Python part over the repo's sources is enough here)"
kvsite=$SIM/site-kvcached-py
rm -rf "$kvsite" && mkdir -p "$kvsite"
cp -r "$ROOT/kvcached" "$ROOT/kvctl" "$kvsite/"
# A --target/PYTHONPATH directory runs no .pth files: the hook's line goes in a
# sitecustomize, so every process (the scheduler's too) arms it as an install would.
cp "$ROOT/kvcached/integrations/kvcached_autopatch.pth" "$kvsite/sitecustomize.py"

echo "== the import hook on SGLang 0.5.17 under Python 3.12 / torch 2.11 (ENABLE_KVCACHED=true)"
(cd "$SIM" && ENABLE_KVCACHED=true LD_LIBRARY_PATH="$SIM/stub" PYTHONPATH="$SIM/site-sglang:$kvsite" "$P" -c '
import sglang.srt.mem_cache.kv_cache_configurator as c
names = [c.MHATokenToKVPool.__name__, c.MLATokenToKVPool.__name__, c.TokenToKVPoolAllocator.__name__,
         c.PagedTokenToKVPoolAllocator.__name__]
print("configurator builds:", ", ".join(names))
assert all(n.startswith("Elastic") for n in names), names
assert hasattr(c.KVCacheConfigurator._profile_available_bytes, "__wrapped__")
' 2>&1 | grep -v Warning | tail -3)

status=0
for mode in plain kvcached; do
    echo "== sglang.launch_server ($mode), until the model runner needs a device"
    log=$SIM/sglang_launch_$mode.log
    extra=()
    [ "$mode" = kvcached ] && extra=(ENABLE_KVCACHED=true KVCACHED_ENGINE_NAME=llama-tiny)
    set +e
    (cd "$SIM" && env "${extra[@]}" LD_LIBRARY_PATH="$SIM/stub" PYTHONPATH="$SIM/site-sglang:$kvsite" \
        HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 timeout 300 "$P" -m sglang.launch_server --model-path "$SIM/llama-tiny" --load-format dummy --attention-backend triton --enable-memory-saver \
        --sampling-backend pytorch --device cuda --port 18790 --served-model-name llama-tiny) > "$log" 2>&1
    set -e
    if grep -E "ModuleNotFoundError|No module named" "$log"; then
        echo "FAIL ($mode): a module is missing (see $log)"; status=1
    elif grep -q "Found no NVIDIA driver" "$log" && grep -q "init_tp_model_worker" "$log"; then
        echo "PASS ($mode): start-up reached the model runner's device init (the first real CUDA need); log $log"
    else
        echo "FAIL ($mode): stopped somewhere else; see $log"; tail -20 "$log"; status=1
    fi
done
exit $status
