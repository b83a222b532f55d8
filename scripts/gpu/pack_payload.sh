#!/usr/bin/env bash
# Pack the wheels an engine's prepare_stage.sh gathered into one reproducible tar, split
# it evenly into pieces of at most PIECE_MIB, and lay them out for chained device calls
# (ROOT/STAGE/partK/, each with SHA256SUMS, PAYLOAD.sha256 and WHEELS.sha256; STAGE is
# ignored through .git/info/exclude). Shared by scripts/gpu/prepare_stage.sh (vLLM) and
# scripts/gpu/sglang/prepare_stage.sh; stage_payload.sh unpacks it on the GPU machine.
#
#   pack_payload.sh BUILD ROOT STAGE PIECE_MIB      # BUILD/wheels/ holds the wheels
#
# PIECE_MIB=auto: as large as a call allows beside the working tree that travels with it
# (64 MiB in all, 1 MiB kept spare), so the piece count grows only when the tree does.
set -euo pipefail
BUILD=$1 ROOT=$2 STAGE=$3 PIECE_MIB=$4
OUT="$ROOT/$STAGE"

# What a device call carries besides the piece: tracked and untracked files git does not
# ignore (stages are ignored). Files deleted but still tracked make stat fail: count what exists.
tree_b=$(cd "$ROOT" && { git ls-files -z -co --exclude-standard | xargs -0 -r stat -c %s 2>/dev/null || true; } \
         | awk '{s+=$1} END {print s+0}')
if [ "$PIECE_MIB" = auto ]; then
    PIECE_MIB=$(( (64 * 1024 * 1024 - tree_b) / 1048576 - 1 ))
    if [ "$PIECE_MIB" -lt 8 ]; then
        echo "pack_payload: the working tree ($(( tree_b / 1048576 )) MiB) leaves under 8 MiB a call for the payload" >&2
        exit 1
    fi
fi

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

rm -rf "$OUT"
k=0
for c in "$BUILD"/chunks/payload.tar.*; do
    k=$((k + 1))
    mkdir -p "$OUT/part$k"
    cp "$c" "$OUT/part$k/"
    cp "$BUILD/SHA256SUMS" "$BUILD/PAYLOAD.sha256" "$BUILD/WHEELS.sha256" "$OUT/part$k/"
done

exclude=$(git -C "$ROOT" rev-parse --git-path info/exclude)
case "$exclude" in /*) ;; *) exclude="$ROOT/$exclude" ;; esac
mkdir -p "$(dirname "$exclude")"
grep -qxF "/$STAGE/" "$exclude" 2>/dev/null || echo "/$STAGE/" >> "$exclude"

echo
echo "payload: $(( total / 1024 / 1024 )) MiB in $n piece(s), id $(cut -c1-12 "$BUILD/PAYLOAD.sha256")"
for d in "$OUT"/part*; do
    printf '  %-20s %6.1f MiB\n' "$STAGE/$(basename "$d")" "$(du -cb "$d" | tail -1 | awk '{print $1/1048576}')"
done
printf '  working tree that travels besides: %.1f MiB (limit 64 MiB with one piece)\n' \
    "$(echo "$tree_b" | awk '{print $1/1048576}')"
biggest=$(du -b "$OUT"/part*/payload.tar.* | sort -n | tail -1 | cut -f1)
if [ $(( biggest + tree_b )) -gt $(( 64 * 1024 * 1024 - 512 * 1024 )) ]; then
    echo "WARNING: a piece plus the working tree exceeds 64 MiB; rerun with a smaller PIECE_MIB" >&2
fi
