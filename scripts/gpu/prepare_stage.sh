#!/usr/bin/env bash
# Recreate .stage/ from scratch on this (networked) machine: the vLLM 0.26.0
# payload for the offline GPU machine, in pieces that each travel in one
# device call (`carry: [".stage/partN"]`). See scripts/gpu/README.md.
#
#   bash scripts/gpu/prepare_stage.sh          # download, slim, split
#
# Env: BUILD (work dir, default /tmp/kvstage-build; downloads are reused),
#      PIECE_MIB (largest piece, default 60), PYTHON (default python3).
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
PIECE_MIB=${PIECE_MIB:-60}
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
(cd "$BUILD/wheels" && sha256sum -- *.whl > "$BUILD/WHEELS.sha256")
cp "$BUILD/WHEELS.sha256" "$BUILD/wheels/WHEELS.sha256"
rm -f "$BUILD/payload.tar"
tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner \
    -cf "$BUILD/payload.tar" -C "$BUILD/wheels" .
total=$(stat -c %s "$BUILD/payload.tar")
max=$(( PIECE_MIB * 1024 * 1024 ))
n=$(( (total + max - 1) / max ))
chunk=$(( (total + n - 1) / n ))
rm -rf "$BUILD/chunks" && mkdir -p "$BUILD/chunks"
split -b "$chunk" -d -a 2 --numeric-suffixes=1 "$BUILD/payload.tar" "$BUILD/chunks/payload.tar."
(cd "$BUILD" && sha256sum payload.tar > PAYLOAD.sha256)
(cd "$BUILD/chunks" && sha256sum payload.tar.* > ../SHA256SUMS)

rm -rf "$ROOT/.stage"
k=0
for c in "$BUILD"/chunks/payload.tar.*; do
    k=$((k + 1))
    d="$ROOT/.stage/part$k"
    mkdir -p "$d"
    cp "$c" "$d/"
    cp "$BUILD/SHA256SUMS" "$BUILD/PAYLOAD.sha256" "$BUILD/WHEELS.sha256" "$d/"
done

exclude=$(git -C "$ROOT" rev-parse --git-path info/exclude)
case "$exclude" in /*) ;; *) exclude="$ROOT/$exclude" ;; esac
mkdir -p "$(dirname "$exclude")"
grep -qxF '/.stage/' "$exclude" 2>/dev/null || echo '/.stage/' >> "$exclude"

echo
echo "payload: $(( total / 1024 / 1024 )) MiB in $n piece(s), id $(cut -c1-12 "$BUILD/PAYLOAD.sha256")"
for d in "$ROOT"/.stage/part*; do
    printf '  %-14s %6.1f MiB\n' ".stage/$(basename "$d")" \
        "$(du -cb "$d" | tail -1 | awk '{print $1/1048576}')"
done
tree_b=$(cd "$ROOT" && git ls-files -z -co --exclude-standard | xargs -0 -r stat -c %s 2>/dev/null \
         | awk '{s+=$1} END {print s+0}')
printf '  working tree that travels besides: %.1f MiB (limit 64 MiB with one piece)\n' \
    "$(echo "$tree_b" | awk '{print $1/1048576}')"
biggest=$(du -b "$ROOT"/.stage/part*/payload.tar.* | sort -n | tail -1 | cut -f1)
if [ $(( biggest + tree_b )) -gt $(( 64 * 1024 * 1024 - 512 * 1024 )) ]; then
    echo "WARNING: a piece plus the working tree exceeds 64 MiB; rerun with a smaller PIECE_MIB" >&2
fi
