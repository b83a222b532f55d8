#!/usr/bin/env bash
# Recreate .stage/ from scratch on this (networked) machine: the vLLM 0.26.0
# payload for the offline GPU machine, in pieces that each travel in one
# device call (`carry: [".stage/partN"]`). See scripts/gpu/README.md.
#
#   bash scripts/gpu/prepare_stage.sh          # download, slim, split
#
# Env: BUILD (work dir, default /tmp/kvstage-build; downloads are reused),
#      PIECE_MIB (largest piece; default auto: what a call leaves beside the working tree),
#      PYTHON (default python3).
# Steps: 1. pip download vllm==0.26.0 (cp312 manylinux wheel, sha256 pinned)
#        2. scripts/gpu/slim_wheel.py drops kernels a dense model on the
#           Triton backend never loads (303 MiB -> ~99 MiB)
#        3. pip download the wheels in scripts/gpu/vllm_deps.txt (--no-deps)
#        4. one tar of all wheels, split evenly into N <= PIECE_MIB pieces
#           under .stage/partK/, each with SHA256SUMS + PAYLOAD.sha256.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
BUILD=${BUILD:-/tmp/kvstage-build}
PIECE_MIB=${PIECE_MIB:-auto}
PY=${PYTHON:-python3}

VLLM_VERSION=0.26.0
VLLM_WHEEL=vllm-${VLLM_VERSION}-cp38-abi3-manylinux_2_28_x86_64.whl
VLLM_SHA256=adb1e4c9b46d0dfdb094121ae5aad670a42412dd813ed4e5db069ed6a15006de

# The GPU image: Python 3.12, glibc >= 2.35 (Ubuntu 24.04 base; torch 2.11 is
# manylinux_2_28). pip matches manylinux_2_N exactly, so list the N we accept.
PIP_DL=(-m pip download --no-deps --only-binary=:all: --python-version 3.12
        --implementation cp
        --platform manylinux_2_35_x86_64 --platform manylinux_2_34_x86_64
        --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64
        --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
        --platform manylinux1_x86_64)

# this machine's pip config names local indexes that may be absent: hush that
quiet() { grep -v "^WARNING: Location 'file:" || true; }

mkdir -p "$BUILD/dl"
echo "== 1. vllm==$VLLM_VERSION"
if ! echo "$VLLM_SHA256  $BUILD/dl/$VLLM_WHEEL" | sha256sum -c --status 2>/dev/null; then
    rm -f "$BUILD/dl/$VLLM_WHEEL"
    "$PY" "${PIP_DL[@]}" -q -d "$BUILD/dl" "vllm==$VLLM_VERSION" 2> >(quiet >&2)
    echo "$VLLM_SHA256  $BUILD/dl/$VLLM_WHEEL" | sha256sum -c
fi

echo "== 2. slim"
rm -rf "$BUILD/wheels" && mkdir -p "$BUILD/wheels"
"$PY" "$HERE/slim_wheel.py" "$BUILD/dl/$VLLM_WHEEL" "$BUILD/wheels"

echo "== 3. dependencies (scripts/gpu/vllm_deps.txt)"
sed -e 's/#.*//' -e 's/[[:space:]]*$//' "$HERE/vllm_deps.txt" | grep -v '^$' > "$BUILD/requirements.txt"
"$PY" "${PIP_DL[@]}" -q -d "$BUILD/deps" -r "$BUILD/requirements.txt" 2> >(quiet >&2)
# copy exactly the pinned files (the deps dir may hold older downloads)
while read -r req; do
    name=${req%%==*}; ver=${req##*==}
    norm=$(echo "$name" | tr 'A-Z-.' 'a-z__')
    f=$(ls "$BUILD/deps" | awk -v n="$norm" -v v="$ver" 'BEGIN{IGNORECASE=1}
        { split($0, p, "-"); g=p[1]; gsub(/[-.]/, "_", g);
          if (tolower(g) == n && p[2] == v) print }' | head -1)
    [ -n "$f" ] || { echo "no wheel for $req in $BUILD/deps" >&2; exit 1; }
    cp "$BUILD/deps/$f" "$BUILD/wheels/"
done < "$BUILD/requirements.txt"
nw=$(ls "$BUILD/wheels" | wc -l); nr=$(( $(wc -l < "$BUILD/requirements.txt") + 1 ))
[ "$nw" -eq "$nr" ] || { echo "expected $nr wheels, got $nw" >&2; ls "$BUILD/wheels"; exit 1; }

echo "== 4. pack and split"
bash "$HERE/pack_payload.sh" "$BUILD" "$ROOT" .stage "$PIECE_MIB"
