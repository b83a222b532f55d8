#!/usr/bin/env bash
# Builds (or reuses) a CPU-only Python environment in which one SGLang version's real KV
# memory modules (memory_pool, allocator, radix_cache, kv_cache_configurator, the
# scheduler's invariant checker and weight updater) import and run on device="cpu",
# with kvcached installed into it (non-editable).
#
# Usage: scripts/ci/setup_sglang_env.sh [VERSION]      VERSION: 0.5.23 (default) or 0.5.17
#   KVCACHED_SGLANG_ENV   where the environment lives
#                         (default: ~/.cache/kvcached-ci/sglang-VERSION)
#   KVCACHED_WHEEL        a kvcached wheel to install (engine_tests.sh builds one for all
#                         environments); without it kvcached is built from this checkout
#                         (~3 min on 2 cores: the compiled core)
# Prints the environment's python as its last line.
#
# Two stamps make it idempotent: the packages are reinstalled, in a new venv, only when
# this script or the version's requirements file changed (scripts/ci/sglang-VERSION-
# requirements.txt, the whole closure, installed with --no-deps); kvcached only when its
# sources (or the given wheel) changed. A failed step leaves no stamp. Needs python3.11,
# PyPI, and torch 2.13.0 in pip's local wheel directory: SGLang 0.5.17 pins torch 2.11.0
# and 0.5.23 pins 2.14.1, neither of which PyPI has as a CPU build; with --no-deps the pin
# is not followed and the memory modules run on 2.13.0.
#
# torchvision: SGLang's config package imports it at module level, and no CPU build
# matching this torch is on PyPI, so an import-only stand-in is put on the path
# (stubs/torchvision; calling anything in it raises). Nothing we run uses it.
set -euo pipefail

readonly SGLANG_VERSION=${1:-0.5.23}
readonly PYTHON_BIN=python3.11

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
readonly script_dir
repo_root=$(cd "$script_dir/../.." && pwd)
readonly repo_root
readonly req_file="$script_dir/sglang-$SGLANG_VERSION-requirements.txt"
readonly env_dir="${KVCACHED_SGLANG_ENV:-$HOME/.cache/kvcached-ci/sglang-$SGLANG_VERSION}"
readonly py="$env_dir/bin/python"
readonly env_stamp="$env_dir/.kvcached-env-complete"
readonly kv_stamp="$env_dir/.kvcached-installed"
readonly wheel="${KVCACHED_WHEEL:-}"

log() { printf '[setup_sglang_env %s %s] %s\n' "$SGLANG_VERSION" "$(date +%H:%M:%S)" "$*" >&2; }
hush() { grep -v "is ignored: it is neither a file nor a directory" >&2 || true; }

if [[ ! -f "$req_file" ]]; then
    echo "setup_sglang_env: no requirements for SGLang $SGLANG_VERSION ($req_file)" >&2
    exit 1
fi

env_fingerprint() { cat "${BASH_SOURCE[0]}" "$req_file" | sha256sum | cut -d' ' -f1; }

kvcached_fingerprint() {
    if [[ -n "$wheel" ]]; then
        sha256sum "$wheel" | cut -d' ' -f1
        return
    fi
    {
        cat "$repo_root/pyproject.toml"
        find "$repo_root/kvcached" "$repo_root/kvctl" "$repo_root/csrc" -type f \
            \( -name '*.py' -o -name '*.cpp' -o -name '*.h' -o -name '*.pth' -o -name '*.txt' \) \
            -not -path '*/__pycache__/*' -print0 | sort -z | xargs -0 cat
    } | sha256sum | cut -d' ' -f1
}

start_s=$SECONDS

if [[ ! -f "$env_stamp" || "$(cat "$env_stamp")" != "$(env_fingerprint)" ]]; then
    log "building a new venv at $env_dir"
    rm -rf "$env_dir"
    mkdir -p "$(dirname "$env_dir")"
    "$PYTHON_BIN" -m venv "$env_dir"

    log "installing the pinned packages (torch from the local wheel, everything --no-deps)"
    "$py" -m pip install --quiet --disable-pip-version-check --no-deps -r "$req_file" 2> >(hush)

    log "writing the torchvision import stand-in"
    stubs="$env_dir/stubs/torchvision"
    mkdir -p "$stubs"
    cat > "$stubs/__init__.py" <<'PY'
"""Import-only stand-in for torchvision in kvcached's SGLang CPU test environment:
every torchvision.* module imports, calling anything in one raises."""

import enum
import importlib.abc
import importlib.machinery
import sys
import types

__version__ = "0.0.0+kvcached.stub"


class InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


class _StubModule(types.ModuleType):
    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        if attr == "InterpolationMode":
            return InterpolationMode

        def unavailable(*args, **kwargs):
            raise RuntimeError(f"{self.__name__}.{attr} is a stand-in in this test environment")

        return unavailable


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StubModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


sys.meta_path.append(_StubFinder())
PY
    site=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    echo "$env_dir/stubs" > "$site/kvcached_ci_stubs.pth"
    env_fingerprint > "$env_stamp"
    log "packages installed in $((SECONDS - start_s)) s"
fi

if [[ ! -f "$kv_stamp" || "$(cat "$kv_stamp")" != "$(kvcached_fingerprint)" ]]; then
    rm -f "$kv_stamp"
    log "installing kvcached from ${wheel:-$repo_root}"
    "$py" -m pip install --quiet --disable-pip-version-check --no-deps --force-reinstall "${wheel:-$repo_root}" \
        2> >(hush)

    log "checking the imports"
    (cd "$env_dir" && "$py" - "$SGLANG_VERSION" <<'PY'
import sys
import torch, sglang
import sglang.srt.mem_cache.memory_pool, sglang.srt.mem_cache.allocator, sglang.srt.mem_cache.radix_cache
import sglang.srt.mem_cache.kv_cache_configurator
import sglang.srt.managers.scheduler_components.invariant_checker
import sglang.srt.managers.scheduler_components.weight_updater
import kvcached._vmm, posix_ipc, pytest
assert sglang.__version__ == sys.argv[1], sglang.__version__
assert torch.__version__.startswith("2.13.0"), torch.__version__
PY
    )
    kvcached_fingerprint > "$kv_stamp"
    log "environment complete in $((SECONDS - start_s)) s ($(du -sh "$env_dir" | cut -f1))"
else
    log "reusing the complete environment"
fi
echo "$py"
