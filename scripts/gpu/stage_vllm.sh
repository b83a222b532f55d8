#!/usr/bin/env bash
# Run on the GPU machine, from the repo root, in each of the chained calls that
# carry one piece of .stage/ (made by scripts/gpu/prepare_stage.sh here):
#
#   call 1  carry [".stage/part1"]   bash scripts/gpu/stage_vllm.sh
#   call 2  carry [".stage/part2"]   bash scripts/gpu/stage_vllm.sh
#   call 3  carry [".stage/part3"]   bash scripts/gpu/stage_vllm.sh --require && ...
#
# Each call appends the pieces it finds under .stage/part*/ to $KVSTAGE
# (/tmp/kvstage: kept while the machine stays warm), checking every piece
# against SHA256SUMS. Once all pieces are there it rebuilds the payload, checks
# its sha256, installs the wheels into $SITE (/tmp/site) with
# `pip install --no-index --no-deps --target`, and verifies that vllm imports
# and that the modules `vllm serve` needs import (scripts/gpu/check_vllm_imports.py).
# Idempotent: an installed payload with the same id is not reinstalled (then
# only `import vllm` is checked, unless --verify).
#
# Exit status: 0 when installed and verified, or when pieces are still missing
# (it says which) unless --require is given, then 3. 1 on any error.
# Env: PYTHON (python3), KVSTAGE (/tmp/kvstage), SITE (/tmp/site).
# Afterwards: export PYTHONPATH=/tmp/site (the image's torch stays in charge).
exec bash "$(dirname "${BASH_SOURCE[0]}")/stage_payload.sh" vllm "$@"
