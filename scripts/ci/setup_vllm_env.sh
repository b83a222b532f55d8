#!/usr/bin/env bash
# Builds (or reuses) a CPU-only Python environment for running one vLLM
# release's own v1 core tests: a venv with the pinned packages, the tests taken
# from vLLM's source distribution, and an offline Hugging Face cache that holds
# only the config.json files those tests read.
#
# Usage: scripts/ci/setup_vllm_env.sh
#   KVCACHED_VLLM_VERSION  the vLLM release (default: 0.33.0); its pinned
#                          closure is scripts/ci/vllm-<version>-requirements.txt
#   KVCACHED_VLLM_ENV      where the environment lives
#                          (default: ~/.cache/kvcached-ci/vllm-<version>)
#
# Idempotent: a finished environment carries a stamp holding a hash of this
# script and the requirements file; while both are unchanged a second run only
# prints the variables to use. Any step that fails leaves no stamp, and the next
# run redoes what is missing. Python runs isolated (-I), so neither PYTHONPATH
# nor the current directory can shadow a module. Needs python3.11, PyPI, and
# torch 2.13.0 in pip's local wheel directory (pip then never fetches a
# multi-GB CUDA build).
set -euo pipefail

readonly VLLM_VERSION="${KVCACHED_VLLM_VERSION:-0.33.0}"
readonly PYTHON_BIN=python3.11
readonly PYPI_SIMPLE_URL=https://pypi.org/simple

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
readonly script_dir
readonly req_file="$script_dir/vllm-$VLLM_VERSION-requirements.txt"
if [[ ! "$VLLM_VERSION" =~ ^[0-9]+\.[0-9]+\.[0-9]+$ || ! -f "$req_file" ]]; then
    echo "setup_vllm_env: no pinned requirements for vLLM '$VLLM_VERSION' ($req_file)" >&2
    exit 2
fi
readonly env_dir="${KVCACHED_VLLM_ENV:-$HOME/.cache/kvcached-ci/vllm-$VLLM_VERSION}"
readonly py="$env_dir/bin/python"
readonly tests_dir="$env_dir/vllm-tests"
readonly hf_home="$env_dir/hf-home"
readonly stamp="$env_dir/.kvcached-setup-complete"

# Test files we run, and the shared conftest; their tests.* imports are followed.
readonly test_seeds=(
    tests/conftest.py
    tests/v1/core/test_prefix_caching.py
    tests/v1/core/test_kv_cache_utils.py
    tests/v1/core/test_scheduler.py
    tests/v1/core/test_single_type_kv_cache_manager.py
)

log() { printf '[setup_vllm_env %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

print_env() {
    cat <<EOF
# vLLM $VLLM_VERSION test environment: $env_dir
export VLLM_TARGET_DEVICE=cpu HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HOME=$hf_home
# python: $py
# tests:  cd $tests_dir && \$python -m pytest -p no:cacheprovider -q tests/v1/core/...
EOF
}

fingerprint() {
    cat "${BASH_SOURCE[0]}" "$req_file" | sha256sum | cut -d' ' -f1
}

if [[ -f "$stamp" && "$(cat "$stamp")" == "$(fingerprint)" ]]; then
    log "reusing complete environment"
    print_env
    exit 0
fi
rm -f "$stamp"
start_s=$SECONDS

# 1. The venv.
if [[ ! -x "$py" ]]; then
    log "creating venv at $env_dir"
    mkdir -p "$(dirname "$env_dir")"
    "$PYTHON_BIN" -I -m venv "$env_dir"
fi

# 2. Packages. The requirements file is the whole closure, pinned, so --no-deps
#    installs exactly it; vllm's own dependency list (CUDA kernels, torch 2.14)
#    is deliberately not followed.
log "installing pinned packages (torch from the local wheel)"
"$py" -I -m pip install --quiet --disable-pip-version-check --no-deps \
    -r "$req_file" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
"$py" -I -c "import torch, vllm; assert torch.__version__.startswith('2.13.0'), torch.__version__; assert vllm.__version__ == '$VLLM_VERSION', vllm.__version__"

# 3. vLLM's source distribution (tests are not in the wheel): its URL and sha256
#    come from the package index's JSON (PEP 691) listing.
log "fetching vllm-$VLLM_VERSION.tar.gz"
mkdir -p "$env_dir/downloads"
sdist=$("$py" -I - "$PYPI_SIMPLE_URL" "$VLLM_VERSION" "$env_dir/downloads" <<'PY'
import hashlib, json, pathlib, sys, urllib.request

index_url, version, dest_dir = sys.argv[1:]
name = f"vllm-{version}.tar.gz"
request = urllib.request.Request(
    f"{index_url}/vllm/", headers={"Accept": "application/vnd.pypi.simple.v1+json"}
)
with urllib.request.urlopen(request, timeout=60) as response:
    files = json.load(response)["files"]
entry = next((f for f in files if f["filename"] == name), None)
if entry is None:
    sys.exit(f"{name} is not listed at {index_url}/vllm/")
expected = entry["hashes"]["sha256"]
path = pathlib.Path(dest_dir) / name

def digest(p: pathlib.Path) -> str:
    h = hashlib.sha256()
    with p.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()

if not (path.exists() and digest(path) == expected):
    partial = path.with_suffix(".part")
    with urllib.request.urlopen(entry["url"], timeout=300) as response, partial.open("wb") as out:
        while chunk := response.read(1 << 20):
            out.write(chunk)
    if digest(partial) != expected:
        sys.exit(f"sha256 mismatch for {name}")
    partial.rename(path)
print(path)
PY
)

# 4. The tests: the seeds plus every tests.* module they import (transitively,
#    lazy imports included), copied outside any source tree so that `import vllm`
#    finds the installed package. pytest.ini registers vLLM's marker names.
log "extracting tests into $tests_dir"
rm -rf "$tests_dir" "$env_dir/sdist"
mkdir -p "$env_dir/sdist"
tar -xzf "$sdist" -C "$env_dir/sdist" \
    "vllm-$VLLM_VERSION/tests" "vllm-$VLLM_VERSION/pyproject.toml"
"$py" -I - "$env_dir/sdist/vllm-$VLLM_VERSION" "$tests_dir" "${test_seeds[@]}" <<'PY'
import ast, pathlib, shutil, sys, tomllib

src_root, dest_root = map(pathlib.Path, sys.argv[1:3])
seeds = sys.argv[3:]

def module_file(module: str) -> pathlib.Path | None:
    base = src_root.joinpath(*module.split("."))
    for candidate in (base / "__init__.py", base.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None

def imported_modules(path: pathlib.Path) -> set[str]:
    package = list(path.relative_to(src_root).parent.parts)
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return {m for m in found if m.split(".")[0] == "tests"}

pending = [src_root / seed for seed in seeds]
wanted: set[pathlib.Path] = set()
while pending:
    path = pending.pop()
    if path in wanted:
        continue
    if not path.is_file():
        sys.exit(f"missing in the sdist: {path.relative_to(src_root)}")
    wanted.add(path)
    parts = path.relative_to(src_root).parent.parts
    for depth in range(1, len(parts) + 1):
        init = src_root.joinpath(*parts[:depth], "__init__.py")
        if init.is_file():
            pending.append(init)
    pending.extend(f for m in imported_modules(path) if (f := module_file(m)))

for path in sorted(wanted):
    target = dest_root / path.relative_to(src_root)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, target)

with (src_root / "pyproject.toml").open("rb") as f:
    markers = tomllib.load(f)["tool"]["pytest"]["ini_options"]["markers"]
names = sorted({m.split(":")[0].strip() for m in markers})
(dest_root / "pytest.ini").write_text(
    "[pytest]\n"
    "addopts = -p kvcached_offline_hub -p kvcached_x86_without_triton\n"
    "asyncio_default_fixture_loop_scope = function\n"
    "markers =\n" + "".join(f"    {name}\n" for name in names)
)
print(f"{len(wanted)} files copied", file=sys.stderr)
PY
rm -rf "$env_dir/sdist"

# A pytest plugin (on by default through pytest.ini; `-p no:kvcached_offline_hub`
# turns it off). With HF_HUB_OFFLINE set, vLLM's hub helper
# (vllm.transformers_utils.repo_utils.with_retry) sleeps 2 s before retrying a
# lookup that offline mode fails every time; each ModelConfig does two such
# lookups. The plugin removes that sleep only: results are unchanged.
cat > "$tests_dir/kvcached_offline_hub.py" <<'PY'
"""Drop vLLM's retry sleep for Hugging Face hub lookups while HF_HUB_OFFLINE is set."""

import os
import time
import types


class _TimeWithoutSleep(types.ModuleType):
    """The time module, except that sleep returns at once."""

    def __getattr__(self, name: str):
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        del seconds


def pytest_configure(config) -> None:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() not in {"1", "true", "yes", "on"}:
        return
    from vllm.transformers_utils import repo_utils

    repo_utils.time = _TimeWithoutSleep("time")
PY

# A second pytest plugin (on by default the same way; `-p no:kvcached_x86_without_triton`
# turns it off). vLLM 0.34 made CpuPlatform.check_and_update_config raise on x86
# without Triton, where 0.33 only warned, so every VllmConfig fails here: Triton
# counts only with triton-cpu and vLLM's own +cpu build, neither on PyPI. The plugin
# lets that one check see Triton; every other reader of HAS_TRITON still gets False,
# and where the check does not raise (0.33) the plugin does nothing.
cat > "$tests_dir/kvcached_x86_without_triton.py" <<'PY'
"""Let vLLM's x86 Triton check pass on a CPU machine without triton-cpu.

vLLM 0.34 raises in CpuPlatform.check_and_update_config ("vLLM on x86 CPUs
requires Triton (triton-cpu).") where 0.33 only warned; every VllmConfig goes
through it. triton-cpu and vLLM's +cpu build (the only one whose HAS_TRITON can be
true on a CPU) are not on PyPI. This plugin makes that one check read
HAS_TRITON as true; every other reader still gets the real value (False). Where
the check does not raise (vLLM 0.33), it does nothing.
"""

import importlib.util
import pathlib
import sys
import types

_RAISE = 'raise RuntimeError("vLLM on x86 CPUs requires Triton (triton-cpu).")'


def pytest_configure(config) -> None:
    # Read the source first: where the check does not raise, only the vllm and
    # vllm.platforms packages get imported.
    spec = importlib.util.find_spec("vllm.platforms.cpu")
    if spec is None or _RAISE not in pathlib.Path(spec.origin).read_text():
        return
    import vllm.triton_utils as triton_utils
    from vllm.platforms.cpu import CpuPlatform

    if triton_utils.HAS_TRITON:
        return
    guarded_code = CpuPlatform.check_and_update_config.__func__.__code__

    class _TritonUtils(types.ModuleType):
        @property
        def HAS_TRITON(self) -> bool:
            # `from vllm.triton_utils import HAS_TRITON` inside the check reads
            # this attribute with the check's frame as the caller.
            if sys._getframe(1).f_code is guarded_code:
                return True
            return self.__dict__["HAS_TRITON"]

    triton_utils.__class__ = _TritonUtils
PY

# 5. An offline Hugging Face cache with a config.json (transformers' defaults for
#    the architecture) for each model the tests name; no weights, no tokenizer.
log "writing config-only HF cache at $hf_home"
"$py" -I - "$hf_home" <<'PY'
import pathlib, sys
import transformers

models = {
    "facebook/opt-125m": ("OPTConfig", "OPTForCausalLM"),
    "Qwen/Qwen3-0.6B": ("Qwen3Config", "Qwen3ForCausalLM"),
    "Qwen/Qwen1.5-7B": ("Qwen2Config", "Qwen2ForCausalLM"),
    "Qwen/Qwen3-Next-80B-A3B-Instruct": ("Qwen3NextConfig", "Qwen3NextForCausalLM"),
    "llava-hf/llava-1.5-7b-hf": ("LlavaConfig", "LlavaForConditionalGeneration"),
}
revision = "0" * 40
hub = pathlib.Path(sys.argv[1]) / "hub"
for repo, (config_class, architecture) in models.items():
    config = getattr(transformers, config_class)()
    config.architectures = [architecture]
    repo_dir = hub / ("models--" + repo.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / revision
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(revision)
    (snapshot / "config.json").write_text(config.to_json_string())
PY

fingerprint > "$stamp"
log "environment complete in $((SECONDS - start_s)) s ($(du -sh "$env_dir" | cut -f1))"
print_env
