#!/usr/bin/env bash
# The staging both engines share, run on the GPU machine from the repo root by
# scripts/gpu/stage_vllm.sh and scripts/gpu/sglang/stage_sglang.sh:
#
#   stage_payload.sh ENGINE [--require] [--verify]      ENGINE: vllm | sglang
#
# Each call appends the pieces it finds under the engine's stage folder (.stage/part*/ or
# .stage-sglang/part*/, carried one per device call) to $KVSTAGE (kept while the machine
# stays warm), checking every piece against SHA256SUMS. Once all pieces are there it
# rebuilds the payload, checks its sha256, installs the wheels into $SITE with
# `pip install --no-index --no-deps --target`, and verifies that the engine imports and
# that the modules its server needs import (the engine's check_*_imports.py).
# Idempotent: an installed payload with the same id is not reinstalled (then only the
# engine's import is checked, unless --verify).
#
# Exit status: 0 when installed and verified, or when pieces are still missing (it
# says which) unless --require is given, then 3. 1 on any error.
# Env: PYTHON (python3), KVSTAGE, SITE (defaults per engine, below).
set -euo pipefail

ENGINE=${1:-}
shift || true
case "$ENGINE" in
    vllm)
        STAGE=.stage KV=${KVSTAGE:-/tmp/kvstage} SITE=${SITE:-/tmp/site}
        CHECK=scripts/gpu/check_vllm_imports.py
        VERSIONS="torch transformers tokenizers triton numpy typing_extensions anyio httpx h11 click prometheus_client annotated_doc huggingface_hub safetensors numba pydantic fastapi posix_ipc"
        export VLLM_NO_USAGE_STATS=1 ;;
    sglang)
        STAGE=.stage-sglang KV=${KVSTAGE:-/tmp/kvstage-sglang} SITE=${SITE:-/tmp/site-sglang}
        CHECK=scripts/gpu/sglang/check_sglang_imports.py
        VERSIONS="torch transformers tokenizers triton huggingface_hub numpy typing_extensions sglang-kernel xgrammar torch_memory_saver pydantic fastapi posix_ipc" ;;
    *) echo "usage: stage_payload.sh vllm|sglang [--require] [--verify]" >&2; exit 1 ;;
esac
REQUIRE=0
VERIFY=0
for a in "$@"; do
    case "$a" in
        --require) REQUIRE=1 ;;
        --verify) VERIFY=1 ;;
        *) echo "usage: stage_payload.sh $ENGINE [--require] [--verify]" >&2; exit 1 ;;
    esac
done
PY=${PYTHON:-python3}
ROOT=$(pwd)
t0=$(date +%s)

mkdir -p "$KV"
shopt -s nullglob
parts=("$ROOT"/"$STAGE"/part*/)

# 1. manifest: take it from any carried part; a different payload resets $KV
for d in "${parts[@]}"; do
    if [ -f "$KV/PAYLOAD.sha256" ] && ! cmp -s "$d/PAYLOAD.sha256" "$KV/PAYLOAD.sha256"; then
        echo "stage: new payload $(cut -c1-12 "$d/PAYLOAD.sha256") replaces $(cut -c1-12 "$KV/PAYLOAD.sha256")"
        rm -f "$KV"/payload.tar* "$KV"/SHA256SUMS "$KV"/PAYLOAD.sha256 "$KV"/WHEELS.sha256
    fi
    cp "$d/SHA256SUMS" "$d/PAYLOAD.sha256" "$d/WHEELS.sha256" "$KV/"
done
if [ ! -f "$KV/SHA256SUMS" ]; then
    echo "stage: no $STAGE/part*/ carried and nothing staged in $KV" >&2
    exit 1
fi
ID=$(cut -c1-64 "$KV/PAYLOAD.sha256")

FRESH=0
if [ -f "$SITE/.kvstage-id" ] && [ "$(cat "$SITE/.kvstage-id")" = "$ID" ]; then
    echo "stage: payload ${ID:0:12} already installed in $SITE"
else
    FRESH=1
    # 2. append the carried pieces, each checked
    for d in "${parts[@]}"; do
        for c in "$d"payload.tar.*; do
            name=$(basename "$c")
            want=$(awk -v n="$name" '$2 == n {print $1}' "$KV/SHA256SUMS")
            [ -n "$want" ] || { echo "stage: $name is not in SHA256SUMS" >&2; exit 1; }
            if [ -f "$KV/$name" ] && echo "$want  $KV/$name" | sha256sum -c --status; then
                continue
            fi
            cp "$c" "$KV/$name.tmp"
            echo "$want  $KV/$name.tmp" | sha256sum -c --status \
                || { echo "stage: $name is corrupt (sha256 mismatch)" >&2; rm -f "$KV/$name.tmp"; exit 1; }
            mv "$KV/$name.tmp" "$KV/$name"
            echo "stage: got $name ($(( $(stat -c %s "$KV/$name") / 1048576 )) MiB)"
        done
    done

    # 3. all there?
    missing=()
    while read -r _ name; do
        [ -f "$KV/$name" ] || missing+=("$name")
    done < "$KV/SHA256SUMS"
    total=$(wc -l < "$KV/SHA256SUMS")
    if [ "${#missing[@]}" -gt 0 ]; then
        echo "stage: PARTIAL $(( total - ${#missing[@]} ))/$total pieces of ${ID:0:12} in $KV; missing: ${missing[*]}"
        [ "$REQUIRE" = 1 ] && exit 3
        exit 0
    fi

    # 4. rebuild, check, unpack, install
    echo "stage: all $total pieces here; rebuilding payload ${ID:0:12}"
    (cd "$KV" && while read -r _ name; do cat "$name"; done < SHA256SUMS > payload.tar)
    (cd "$KV" && sha256sum -c --status PAYLOAD.sha256) \
        || { echo "stage: payload.tar sha256 mismatch" >&2; rm -f "$KV/payload.tar"; exit 1; }
    rm -rf "$KV/wheels" && mkdir -p "$KV/wheels"
    tar -xf "$KV/payload.tar" -C "$KV/wheels"
    (cd "$KV/wheels" && sha256sum -c --status WHEELS.sha256) \
        || { echo "stage: a wheel failed its sha256" >&2; exit 1; }
    mkdir -p "$SITE"   # other wheels may live there too: --upgrade replaces only ours
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --disable-pip-version-check --upgrade --target "$SITE" "$KV"/wheels/*.whl
    echo "$ID" > "$SITE/.kvstage-id"
    rm -f "$KV"/payload.tar "$KV"/payload.tar.[0-9]*
    rm -rf "$KV/wheels"
    echo "stage: installed $(ls "$SITE" | grep -c '\.dist-info$') distributions into $SITE in $(( $(date +%s) - t0 )) s"
fi

# 5. verify
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DO_NOT_TRACK=1
"$PY" - "$ENGINE" $VERSIONS <<'EOF'
import importlib, importlib.metadata as md, sys
engine = importlib.import_module(sys.argv[1])
print(f"stage: {sys.argv[1]} {engine.__version__} at {engine.__file__}")
vers = []
for n in sys.argv[2:]:
    try:
        vers.append(f"{n} {md.version(n)}")
    except md.PackageNotFoundError:
        vers.append(f"{n} -")
print("stage: " + ", ".join(vers))
EOF
# the full import check once, right after installing (or with --verify)
if [ "$FRESH" = 1 ] || [ "$VERIFY" = 1 ]; then
    "$PY" "$ROOT/$CHECK"
fi
echo "stage: done in $(( $(date +%s) - t0 )) s; use: export PYTHONPATH=$SITE"
