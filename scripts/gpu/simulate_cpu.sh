#!/usr/bin/env bash
# Rehearse the GPU-machine staging on this CPU-only machine, as far as it goes
# without a GPU. Needs .stage/ (prepare_stage.sh) and ~6 GB under $SIM.
#
#   bash scripts/gpu/simulate_cpu.sh
#
# 1. A Python 3.12 venv shaped like the GPU image: torch 2.11.0 (+cu130 wheels
#    from PyPI), transformers 5.17.0, tokenizers 0.23.2 and the image's other
#    packages that vLLM touches — none of the carried ones.
# 2. stage_vllm.sh run once per piece from scratch roots that each hold only
#    one .stage/partK each (as the chained calls will).
# 3. A stub libcuda.so.1 (the cu* symbols vllm's .so files link, all failing)
#    and a fake-H100 platform plugin (scripts/gpu/cpu_sim/) let the CUDA code
#    paths import; then `vllm serve` of the tiny model runs the real start-up
#    path (args, config, tokenizer, engine core process) until the worker needs
#    a device. Pass = it stops there, with no missing module on the way.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
export SIM=${SIM:-/tmp/kvsim}
# (a pyenv shim named python3.12 may exist and still refuse to run: ask it for its path)
PY312=${PY312:-$(python3.12 -c 'import sys; print(sys.executable)' 2>/dev/null || echo /root/.pyenv/versions/3.12.1/bin/python3.12)}
V=$SIM/venv312
P=$V/bin/python

mkdir -p "$SIM"
if [ ! -x "$P" ] || ! "$P" -c "import torch, transformers" 2>/dev/null; then
    echo "== venv like the GPU image (a few minutes, ~5 GB)"
    "$PY312" -m venv "$V"
    "$P" -m pip install -q -U pip
    "$P" -m pip install -q torch==2.11.0 torchvision==0.26.0 torchaudio==2.11.0 \
        transformers==5.17.0 tokenizers==0.23.2 huggingface_hub==1.33.0 safetensors==0.8.0 \
        numpy==2.5.2 tiktoken==0.14.0 sentencepiece==0.2.2 triton==3.6.0 \
        numba pillow pyyaml regex requests tqdm psutil py-cpuinfo aiohttp anyio httpx h11 \
        click rich typer uvloop prometheus-client protobuf cloudpickle einops msgpack \
        opencv-python-headless packaging six xxhash ninja lxml annotated-doc
fi
# the carried packages must not be in the image-like venv
# (those marked [shadows image] are in the image too: they stay)
carried=$(grep -v 'shadows image' "$HERE/vllm_deps.txt" | sed -e 's/#.*//' -e 's/==.*//' \
          | grep -v '^\s*$' | tr '\n' ' ')
"$P" -m pip uninstall -q -y vllm $carried 2>/dev/null || true

echo "== stub libcuda.so.1"
mkdir -p "$SIM/stub"
{
    echo "int cuGetProcAddress_v2(void){return 100;}"
    for s in cuCtxGetCurrent cuCtxSetCurrent cuDeviceGetAttribute cuDevicePrimaryCtxRetain \
             cuGetErrorString cuMemAddressFree cuMemAddressReserve cuMemCreate \
             cuMemGetAllocationGranularity cuMemMap cuMemRelease cuMemSetAccess cuMemUnmap \
             cuPointerGetAttribute cuTensorMapEncodeTiled; do
        echo "int $s(void){return 100;}"   # CUDA_ERROR_NO_DEVICE
    done
} > "$SIM/stub/cuda_stub.c"
gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$SIM/stub/libcuda.so.1" "$SIM/stub/cuda_stub.c"

echo "== stage_vllm.sh, one piece per call"
rm -rf "$SIM/kvstage" "$SIM/site"
n=0
for part in "$ROOT"/.stage/part*; do
    n=$((n + 1))
    r=$SIM/root$n
    rm -rf "$r" && mkdir -p "$r/.stage" "$r/scripts"
    ln -s "$part" "$r/.stage/$(basename "$part")"
    ln -s "$HERE" "$r/scripts/gpu"
    (cd "$r" && LD_LIBRARY_PATH=$SIM/stub PYTHON=$P KVSTAGE=$SIM/kvstage SITE=$SIM/site \
        bash scripts/gpu/stage_vllm.sh) 2>&1 | grep -v "^INFO\|^WARNING\|^W[0-9]"
done

"$P" "$HERE/make_model.py" "$SIM/llama-tiny" --tiny --check | tail -3
SIMENV=(env FAKECUDA=1 "PYTHONPATH=$SIM/site:$HERE/cpu_sim" "LD_LIBRARY_PATH=$SIM/stub"
        HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1)

echo "== imports on the CUDA branches + the server app with dev routes (fake H100)"
"${SIMENV[@]}" "$P" "$HERE/check_vllm_imports.py" --app "$SIM/llama-tiny" 2>&1 \
    | grep -E "^(vllm |MISSING|ERROR|[0-9]+/|app:|Traceback)"

echo "== GPU-less render server: chat template + tokenizer through HTTP"
"${SIMENV[@]}" setsid "$P" -m vllm.entrypoints.cli.main launch render "$SIM/llama-tiny" \
    --port 18778 > "$SIM/render.log" 2>&1 &
rpid=$!
"$P" - "$SIM/llama-tiny" <<'EOF'
import json, sys, time, urllib.request
base = "http://127.0.0.1:18778"
for _ in range(150):
    try:
        urllib.request.urlopen(base + "/health", timeout=2)
        break
    except Exception:
        time.sleep(2)
body = {"model": sys.argv[1], "messages": [{"role": "user", "content": "Hello, who are you?"}]}
req = urllib.request.Request(base + "/v1/chat/completions/render", json.dumps(body).encode(),
                             {"Content-Type": "application/json"})
ids = json.load(urllib.request.urlopen(req, timeout=30))["token_ids"]
print("render: chat prompt ids", ids[:8], "...", ids[-4:])
assert ids[0] == 128000 and 128009 in ids
EOF
kill -TERM -- "-$rpid" 2>/dev/null || true

echo "== vllm serve (tiny, dummy weights) on a fake H100, until the worker needs a device"
log=$SIM/serve.log
set +e
"${SIMENV[@]}" timeout 600 "$P" -m vllm.entrypoints.cli.main serve "$SIM/llama-tiny" \
    --load-format dummy --attention-backend TRITON_ATTN --max-model-len 2048 \
    --port 18777 > "$log" 2>&1
set -e
grep -E "ModuleNotFoundError|No module named" "$log" && { echo "FAIL: a module is missing (see $log)"; exit 1; }
if grep -q "out of bounds for 0 devices" "$log"; then
    echo "PASS: start-up reached the worker's device init (the first real CUDA need); log $log"
else
    echo "FAIL: stopped somewhere else; see $log"; tail -30 "$log"; exit 1
fi
