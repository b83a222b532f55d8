#!/usr/bin/env bash
# Runs kvcached's SGLang integration tests (tests/engines/sglang, marked `engine`) once per
# supported SGLang version, each in the CPU environment setup_sglang_env.sh builds for it
# (called first; quick when the environment is complete). The tests drive SGLang's real
# KV pools, allocators, radix cache and scheduler checks with kvcached active on the
# host backend. Every version runs even if an earlier one fails.
#
# Usage: scripts/ci/run_sglang_tests.sh [PYTEST_ARGS...]
#   KVCACHED_SGLANG_VERSIONS   the versions to run (default: "0.5.17 0.5.23")
#   KVCACHED_WHEEL             a kvcached wheel to install (see setup_sglang_env.sh)
#   KVCACHED_SGLANG_ENV        the environment's path; only with a single version
# Exit status: non-zero if any version's run failed.
set -euo pipefail

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
readonly script_dir
repo_root=$(cd "$script_dir/../.." && pwd)
readonly repo_root
read -r -a versions <<< "${KVCACHED_SGLANG_VERSIONS:-0.5.17 0.5.23}"
readonly versions
if [[ ${#versions[@]} -gt 1 && -n "${KVCACHED_SGLANG_ENV:-}" ]]; then
    echo "run_sglang_tests: KVCACHED_SGLANG_ENV names one environment; set KVCACHED_SGLANG_VERSIONS to one version" >&2
    exit 2
fi

failed=()
for version in "${versions[@]}"; do
    echo "== SGLang $version"
    py=$("$script_dir/setup_sglang_env.sh" "$version" | tail -n 1)
    extra_env=()
    if [[ "$version" == 0.5.17 ]]; then
        # 0.5.17's paged allocator runs its Triton index kernels on every device (0.5.23
        # falls back to torch code where Triton cannot run); on the CPU, Triton's
        # interpreter runs those same kernels.
        extra_env+=(TRITON_INTERPRET=1)
    fi
    # From a directory outside the checkout, so `import kvcached` is the installed copy
    # (with its compiled core), and with the repository's pytest settings (markers).
    if ! (cd "$(dirname "$py")/.." && env "${extra_env[@]}" "$py" -m pytest -p no:cacheprovider -q \
            -c "$repo_root/pyproject.toml" --rootdir "$repo_root" "$repo_root/tests/engines/sglang" "$@"); then
        failed+=("$version")
    fi
done
if [[ ${#failed[@]} -gt 0 ]]; then
    echo "run_sglang_tests: failed on SGLang ${failed[*]}" >&2
    exit 1
fi
