#!/usr/bin/env bash
# Start a real `vllm serve` on a dummy-weight Llama-3.1-8B-shaped model, wait
# until /health answers, send one completion and one chat request, stop it.
# Run on the GPU machine after scripts/gpu/stage_vllm.sh (PYTHONPATH=/tmp/site).
#
#   bash scripts/gpu/serve_smoke.sh                 # 8B shape
#   TINY=1 bash scripts/gpu/serve_smoke.sh          # 2 layers, hidden 256
#   bash scripts/gpu/serve_smoke.sh --enforce-eager # extra args go to vllm serve
#
# Env: MODEL (folder; made with make_model.py if absent), TINY=1, PORT (8000),
#      WAIT_S (start-up limit, 420), LOG (server log; $OUT/vllm_serve.log if $OUT
#      is set), MAX_MODEL_LEN (8192), PYTHON (python3), SITE (/tmp/site).
# Exit status 0 when both requests returned text.
set -uo pipefail

PY=${PYTHON:-python3}
SITE=${SITE:-/tmp/site}
PORT=${PORT:-8000}
WAIT_S=${WAIT_S:-420}
MAX_MODEL_LEN=${MAX_MODEL_LEN:-8192}
if [ "${TINY:-0}" = 1 ]; then MODEL=${MODEL:-/tmp/llama-tiny}; SHAPE=--tiny; else MODEL=${MODEL:-/tmp/llama8b}; SHAPE=; fi
LOG=${LOG:-${OUT:-/tmp}/vllm_serve.log}
ROOT=$(pwd)

export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
export PYTHONUNBUFFERED=1

[ -f "$MODEL/config.json" ] || "$PY" "$ROOT/scripts/gpu/make_model.py" "$MODEL" $SHAPE || exit 1

t0=$(date +%s)
# job control: the server gets its own process group (so the cleanup below
# stops the engine core too) but stays in this session, so the device tool
# still ends it if this script is killed at its time limit
set -m
"$PY" -m vllm.entrypoints.cli.main serve "$MODEL" \
    --load-format dummy --attention-backend TRITON_ATTN \
    --max-model-len "$MAX_MODEL_LEN" --host 127.0.0.1 --port "$PORT" \
    --served-model-name llama "$@" > "$LOG" 2>&1 &
SRV=$!
set +m
stop() {
    kill -TERM -- "-$SRV" 2>/dev/null
    for _ in $(seq 1 30); do kill -0 "$SRV" 2>/dev/null || break; sleep 1; done
    kill -KILL -- "-$SRV" 2>/dev/null
}
trap stop EXIT

"$PY" - "$PORT" "$WAIT_S" "$SRV" <<'EOF'
import json, os, sys, time, urllib.request
port, wait_s, pid = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
base = f"http://127.0.0.1:{port}"
t0 = time.time()
while True:
    try:
        with urllib.request.urlopen(base + "/health", timeout=2) as r:
            if r.status == 200:
                break
    except Exception:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        sys.exit("smoke: server exited before it became healthy")
    if time.time() - t0 > wait_s:
        sys.exit(f"smoke: not healthy after {wait_s:.0f} s")
    time.sleep(2)
print(f"smoke: healthy after {time.time() - t0:.0f} s")

def post(path, body):
    req = urllib.request.Request(base + path, json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    t = time.time()
    with urllib.request.urlopen(req, timeout=120) as r:
        out = json.load(r)
    return out, time.time() - t

with urllib.request.urlopen(base + "/v1/models", timeout=10) as r:
    print("smoke: models", [m["id"] for m in json.load(r)["data"]])
out, dt = post("/v1/completions", {"model": "llama", "prompt": "The memory page is",
                                   "max_tokens": 32, "temperature": 0})
c = out["choices"][0]
print(f"smoke: completion {dt:.2f} s, {out['usage']}, finish={c['finish_reason']}, text={c['text'][:80]!r}")
out, dt = post("/v1/chat/completions", {"model": "llama", "max_tokens": 16,
               "messages": [{"role": "user", "content": "Hello, who are you?"}]})
c = out["choices"][0]
print(f"smoke: chat {dt:.2f} s, {out['usage']}, text={c['message']['content'][:80]!r}")
EOF
rc=$?
echo "smoke: rc=$rc after $(( $(date +%s) - t0 )) s; server log $LOG (last lines below)"
grep -E "Available KV cache memory|GPU KV cache size|Maximum concurrency|Model loading took|torch.compile takes|Graph capturing finished|init engine|ERROR|Error" "$LOG" | tail -15
[ $rc -eq 0 ] || tail -40 "$LOG"
exit $rc
