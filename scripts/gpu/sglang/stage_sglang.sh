#!/usr/bin/env bash
# Run on the GPU machine, from the repo root, in each of the chained calls that carry
# one piece of .stage-sglang/ (made by scripts/gpu/sglang/prepare_stage.sh here):
#
#   call 1  carry [".stage-sglang/part1"]   bash scripts/gpu/sglang/stage_sglang.sh
#   call 2  carry [".stage-sglang/part2"]   bash scripts/gpu/sglang/stage_sglang.sh --require && ...
#
# Each call appends the pieces it finds under .stage-sglang/part*/ to $KVSTAGE
# (/tmp/kvstage-sglang: kept while the machine stays warm), checking every piece
# against SHA256SUMS. Once all pieces are there it rebuilds the payload, checks its
# sha256, installs the wheels into $SITE (/tmp/site-sglang) with
# `pip install --no-index --no-deps --target`, and verifies that sglang imports and
# that the modules `sglang.launch_server` needs import
# (scripts/gpu/sglang/check_sglang_imports.py). Idempotent: an installed payload with
# the same id is not reinstalled (then only `import sglang` is checked, unless --verify).
#
# Exit status: 0 when installed and verified, or when pieces are still missing (it
# says which) unless --require is given, then 3. 1 on any error.
# Env: PYTHON (python3), KVSTAGE (/tmp/kvstage-sglang), SITE (/tmp/site-sglang).
# Afterwards: export PYTHONPATH=/tmp/site-sglang (the image's torch stays in charge).
set -euo pipefail

REQUIRE=0
VERIFY=0
for a in "$@"; do
    case "$a" in
        --require) REQUIRE=1 ;;
        --verify) VERIFY=1 ;;
        *) echo "usage: stage_sglang.sh [--require] [--verify]" >&2; exit 1 ;;
    esac
done
PY=${PYTHON:-python3}
KV=${KVSTAGE:-/tmp/kvstage-sglang}
SITE=${SITE:-/tmp/site-sglang}
ROOT=$(pwd)
t0=$(date +%s)

mkdir -p "$KV"
shopt -s nullglob
parts=("$ROOT"/.stage-sglang/part*/)

# 1. manifest: take it from any carried part; a different payload resets $KV
for d in "${parts[@]}"; do
    if [ -f "$KV/PAYLOAD.sha256" ] && ! cmp -s "$d/PAYLOAD.sha256" "$KV/PAYLOAD.sha256"; then
        echo "stage: new payload $(cut -c1-12 "$d/PAYLOAD.sha256") replaces $(cut -c1-12 "$KV/PAYLOAD.sha256")"
        rm -f "$KV"/payload.tar* "$KV"/SHA256SUMS "$KV"/PAYLOAD.sha256 "$KV"/WHEELS.sha256
    fi
    cp "$d/SHA256SUMS" "$d/PAYLOAD.sha256" "$d/WHEELS.sha256" "$KV/"
done
if [ ! -f "$KV/SHA256SUMS" ]; then
    echo "stage: no .stage-sglang/part*/ carried and nothing staged in $KV" >&2
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
"$PY" - <<'EOF'
import importlib.metadata as md
import sglang
print(f"stage: sglang {sglang.__version__} at {sglang.__file__}")
names = ["torch", "transformers", "tokenizers", "triton", "huggingface_hub", "numpy", "typing_extensions",
         "sglang-kernel", "xgrammar", "torch_memory_saver", "pydantic", "fastapi", "posix_ipc"]
vers = []
for n in names:
    try:
        vers.append(f"{n} {md.version(n)}")
    except md.PackageNotFoundError:
        vers.append(f"{n} -")
print("stage: " + ", ".join(vers))
EOF
# the full import check once, right after installing (or with --verify)
if [ "$FRESH" = 1 ] || [ "$VERIFY" = 1 ]; then
    "$PY" "$ROOT/scripts/gpu/sglang/check_sglang_imports.py"
fi
echo "stage: done in $(( $(date +%s) - t0 )) s; use: export PYTHONPATH=$SITE"
