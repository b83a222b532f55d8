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
exec bash "$(dirname "${BASH_SOURCE[0]}")/../stage_payload.sh" sglang "$@"
