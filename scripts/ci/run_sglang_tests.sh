#!/usr/bin/env bash
# Runs kvcached's SGLang integration tests (tests/engines/sglang, marked `engine`) in the
# SGLang 0.5.23 CPU environment that setup_sglang_env.sh builds (called first; quick
# when the environment is complete). The tests drive SGLang's real KV pool, allocators,
# radix cache and scheduler checks with kvcached active on the host backend.
#
# Usage: scripts/ci/run_sglang_tests.sh [PYTEST_ARGS...]
#   KVCACHED_SGLANG_ENV   the environment (as for setup_sglang_env.sh)
set -euo pipefail

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
readonly script_dir
repo_root=$(cd "$script_dir/../.." && pwd)
readonly repo_root

py=$("$script_dir/setup_sglang_env.sh" | tail -n 1)
readonly py

# From a directory outside the checkout, so `import kvcached` is the installed copy
# (with its compiled core), and with the repository's pytest settings (markers).
cd "$(dirname "$py")/.."
exec "$py" -m pytest -p no:cacheprovider -q -c "$repo_root/pyproject.toml" \
    --rootdir "$repo_root" "$repo_root/tests/engines/sglang" "$@"
