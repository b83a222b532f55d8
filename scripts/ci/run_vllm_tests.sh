#!/usr/bin/env bash
# Runs a vLLM release's own v1 core tests (four files of tests/v1/core/) against
# the installed vllm in the environment that setup_vllm_env.sh builds (it is
# called first, and is quick when the environment is complete).
#
# Usage: scripts/ci/run_vllm_tests.sh [--expect-failures FILE] [PYTEST_ARGS...]
#   PYTEST_ARGS go to pytest unchanged (e.g. -p some_plugin, -k expr, -x).
#   --expect-failures FILE: exit 0 when every failing test id appears in FILE
#       (any text holding ids such as tests/v1/core/test_x.py::test_y[p], e.g.
#       docs/notes/vllm-baseline.md or a failed.txt), 1 otherwise; without it
#       the exit status is pytest's.
#   KVCACHED_VLLM_VERSION   the vLLM release (default: 0.33.0; as for setup_vllm_env.sh)
#   KVCACHED_VLLM_ENV       the environment (as for setup_vllm_env.sh)
#   KVCACHED_VLLM_TESTS_OUT where junit.xml, summary.md and failed.txt go
#                           (default: <repo>/out/vllm-tests)
set -euo pipefail

readonly VLLM_VERSION="${KVCACHED_VLLM_VERSION:-0.33.0}"
readonly test_files=(
    tests/v1/core/test_prefix_caching.py
    tests/v1/core/test_kv_cache_utils.py
    tests/v1/core/test_scheduler.py
    tests/v1/core/test_single_type_kv_cache_manager.py
)

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
readonly script_dir
repo_root=$(cd "$script_dir/../.." && pwd)
readonly repo_root
readonly env_dir="${KVCACHED_VLLM_ENV:-$HOME/.cache/kvcached-ci/vllm-$VLLM_VERSION}"
readonly out_dir="${KVCACHED_VLLM_TESTS_OUT:-$repo_root/out/vllm-tests}"

expect_file=""
if [[ "${1:-}" == "--expect-failures" ]]; then
    [[ $# -ge 2 && -f "$2" ]] || { echo "run_vllm_tests: --expect-failures needs a file" >&2; exit 2; }
    expect_file=$(cd "$(dirname "$2")" && pwd)/$(basename "$2")
    shift 2
fi

KVCACHED_VLLM_VERSION="$VLLM_VERSION" KVCACHED_VLLM_ENV="$env_dir" \
    "$script_dir/setup_vllm_env.sh" >/dev/null

mkdir -p "$out_dir"
rm -f "$out_dir/junit.xml" "$out_dir/summary.md" "$out_dir/failed.txt"

start_s=$SECONDS
rc=0
(
    cd "$env_dir/vllm-tests"
    VLLM_TARGET_DEVICE=cpu HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
        HF_HOME="$env_dir/hf-home" \
        "$env_dir/bin/python" -m pytest -p no:cacheprovider -q \
        --junitxml="$out_dir/junit.xml" "${test_files[@]}" "$@"
) || rc=$?
elapsed_s=$((SECONDS - start_s))

if [[ ! -s "$out_dir/junit.xml" ]]; then
    echo "run_vllm_tests: pytest wrote no junit xml (exit $rc)" >&2
    exit "$(( rc == 0 ? 1 : rc ))"
fi

# Per-file counts and one line per failing test, from the junit xml.
"$env_dir/bin/python" -I - "$out_dir" "$env_dir/vllm-tests" "$elapsed_s" "$rc" "$expect_file" <<'PY'
import collections, pathlib, re, sys
import xml.etree.ElementTree as ET

out_dir, tests_dir = map(pathlib.Path, sys.argv[1:3])
elapsed_s, pytest_rc, expect_file = int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]


def split_classname(classname: str) -> tuple[str, list[str]]:
    """'tests.a.test_b.TestC' -> ('tests/a/test_b.py', ['TestC'])."""
    parts = classname.split(".")
    for cut in range(len(parts), 0, -1):
        path = "/".join(parts[:cut]) + ".py"
        if (tests_dir / path).is_file():
            return path, parts[cut:]
    return "/".join(parts) + ".py", []


counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
failures: list[tuple[str, str]] = []
for case in ET.parse(out_dir / "junit.xml").iter("testcase"):
    path, classes = split_classname(case.get("classname", ""))
    test_id = "::".join([path, *classes, case.get("name", "")])
    outcome = "passed"
    for tag in ("failure", "error", "skipped"):
        element = case.find(tag)
        if element is not None:
            outcome = {"failure": "failed", "error": "errors"}.get(tag, "skipped")
            if tag != "skipped":
                message = (element.get("message") or element.text or "").strip()
                reason = " ".join(message.split())
                # pydantic's wrapper says nothing; keep the model and its error.
                reason = re.sub(
                    r"^pydantic_core\._pydantic_core\.ValidationError: \d+ validation "
                    r"errors? for (\w+) Value error, ",
                    r"\1: ",
                    reason,
                ).split(" [type=")[0][:200]
                failures.append((test_id, reason))
            break
    counts[path][outcome] += 1

columns = ("passed", "failed", "errors", "skipped")
lines = [
    f"# vLLM tests: {sum(sum(c.values()) for c in counts.values())} run "
    f"in {elapsed_s} s, pytest exit {pytest_rc}",
    "",
    "| file | " + " | ".join(columns) + " |",
    "|---|" + "---|" * len(columns),
]
for path in sorted(counts):
    lines.append(f"| {path} | " + " | ".join(str(counts[path][c]) for c in columns) + " |")
lines += ["", f"## Failing ({len(failures)})", ""]
lines += [f"- `{test_id}` — {reason}" for test_id, reason in sorted(failures)]
(out_dir / "summary.md").write_text("\n".join(lines) + "\n")
(out_dir / "failed.txt").write_text("".join(f"{t}\n" for t, _ in sorted(failures)))
print("\n".join(lines[:4 + len(counts)]))

if expect_file:
    # Any test id found in the file counts, so a baseline note can be passed as is.
    expected = set(
        re.findall(r"(tests/[^\s`]+\.py::[^\s`]+)", pathlib.Path(expect_file).read_text())
    )
    unexpected = sorted(t for t, _ in failures if t not in expected)
    for test_id in unexpected:
        print(f"unexpected failure: {test_id}")
    print(f"{len(unexpected)} unexpected failures (baseline lists {len(expected)})")
    sys.exit(1 if unexpected else 0)
sys.exit(pytest_rc)
PY
