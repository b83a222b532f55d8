#!/usr/bin/env bash
# Recreate .stage-sglang/ from scratch on this (networked) machine: the SGLang 0.5.17
# payload for the offline GPU machine, in pieces that each travel in one device call
# (`carry: [".stage-sglang/partN"]`). See scripts/gpu/sglang/README.md.
#
#   bash scripts/gpu/sglang/prepare_stage.sh
#
# Env: BUILD (work dir, default /tmp/kvstage-sglang-build; downloads are reused),
#      PIECE_MIB (largest piece; default auto: what a call leaves beside the working tree),
#      PYTHON (default python3),
#      KEEP_SM100=1 keeps sgl_kernel's Blackwell ops (+15 MiB).
# Steps: 1. pip download sglang==0.5.17 and sglang-kernel==0.4.5 (cp312 manylinux
#           wheels, sha256 pinned)
#        2. pip download the wheels in scripts/gpu/sglang/sglang_deps.txt (--no-deps)
#        3. slim_wheels.py: the kernel wheel without FA3/FlashMLA/InfLLM/sm100
#           (365 -> 14 MiB), xgrammar without its static library (43 -> 13 MiB)
#        4. one tar of all wheels, split evenly into N <= PIECE_MIB pieces under
#           .stage-sglang/partK/, each with SHA256SUMS + PAYLOAD.sha256 + WHEELS.sha256.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../../.." && pwd)
BUILD=${BUILD:-/tmp/kvstage-sglang-build}
PIECE_MIB=${PIECE_MIB:-auto}
PY=${PYTHON:-python3}

SGLANG_WHEEL=sglang-0.5.17-cp312-cp312-manylinux_2_34_x86_64.whl
SGLANG_SHA256=fb4cba478a5dca5ee146550b39f33add1c4e475d21ee11810b86ed1c58068093
KERNEL_WHEEL=sglang_kernel-0.4.5-cp310-abi3-manylinux2014_x86_64.whl
KERNEL_SHA256=5927a14dfff92ced8b1f7c7d5844144bc574ec58e604d4fd53e6f53c709003a8

# The GPU image: Python 3.12, glibc >= 2.35. pip matches manylinux_2_N exactly, so
# list the N we accept.
PIP_DL=(-m pip download --no-deps --only-binary=:all: --python-version 3.12
        --implementation cp
        --platform manylinux_2_35_x86_64 --platform manylinux_2_34_x86_64
        --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64
        --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
        --platform manylinux1_x86_64 --platform linux_x86_64)

# this machine's pip config names local indexes that may be absent: hush that
quiet() { grep -v "^WARNING: Location 'file:" || true; }

fetch_pinned() {  # name==version, file, sha256
    if ! echo "$3  $BUILD/dl/$2" | sha256sum -c --status 2>/dev/null; then
        rm -f "$BUILD/dl/$2"
        "$PY" "${PIP_DL[@]}" -q -d "$BUILD/dl" "$1" 2> >(quiet >&2)
        echo "$3  $BUILD/dl/$2" | sha256sum -c
    fi
}

mkdir -p "$BUILD/dl" "$BUILD/deps"
echo "== 1. sglang==0.5.17, sglang-kernel==0.4.5"
fetch_pinned sglang==0.5.17 "$SGLANG_WHEEL" "$SGLANG_SHA256"
fetch_pinned sglang-kernel==0.4.5 "$KERNEL_WHEEL" "$KERNEL_SHA256"

echo "== 2. dependencies (scripts/gpu/sglang/sglang_deps.txt)"
sed -e 's/#.*//' -e 's/[[:space:]]*$//' "$HERE/sglang_deps.txt" | grep -v '^$' > "$BUILD/requirements.txt"
"$PY" "${PIP_DL[@]}" -q -d "$BUILD/deps" -r "$BUILD/requirements.txt" 2> >(quiet >&2)
# exactly the pinned files (the deps dir may hold other downloads)
picked=()
while read -r req; do
    name=${req%%==*}; ver=${req##*==}
    norm=$(echo "$name" | tr 'A-Z-.' 'a-z__')
    f=$(ls "$BUILD/deps" | awk -v n="$norm" -v v="$ver" '
        { split($0, p, "-"); g=tolower(p[1]); gsub(/[-.]/, "_", g);
          if (g == n && p[2] == v) print }' | head -1)
    [ -n "$f" ] || { echo "no wheel for $req in $BUILD/deps" >&2; exit 1; }
    picked+=("$BUILD/deps/$f")
done < "$BUILD/requirements.txt"

echo "== 3. slim"
rm -rf "$BUILD/wheels" && mkdir -p "$BUILD/wheels"
keep=()
[ "${KEEP_SM100:-0}" = 1 ] && keep=(--keep-sm100)
"$PY" "$HERE/slim_wheels.py" "$BUILD/wheels" "$BUILD/dl/$SGLANG_WHEEL" "$BUILD/dl/$KERNEL_WHEEL" "${picked[@]}" "${keep[@]}"
nw=$(ls "$BUILD/wheels" | wc -l); nr=$(( $(wc -l < "$BUILD/requirements.txt") + 2 ))
[ "$nw" -eq "$nr" ] || { echo "expected $nr wheels, got $nw" >&2; ls "$BUILD/wheels"; exit 1; }

echo "== 4. pack and split"
bash "$HERE/../pack_payload.sh" "$BUILD" "$ROOT" .stage-sglang "$PIECE_MIB"
