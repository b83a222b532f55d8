#!/usr/bin/env python3
"""Import the SGLang 0.5.17 modules that `python -m sglang.launch_server` walks for a dense
Llama on the Triton attention backend (dummy weights, memory saver on), and report any
that fail.

Exit status 0 when every module imported; otherwise 1, with one line per failure,
grouped by the missing top-level package where that is the cause.

Run on the GPU machine after stage_sglang.sh (PYTHONPATH=/tmp/site-sglang) and here in
the image-like Python 3.12 venv (scripts/gpu/sglang/simulate_cpu.sh), where the CUDA-only
branches are not taken.

    check_sglang_imports.py [-v]
"""

from __future__ import annotations

import importlib
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from serving import import_all

MODULES = [
    "sglang",
    "sglang.launch_server",
    "sglang.srt.server_args",
    "sglang.srt.entrypoints.http_server",
    "sglang.srt.entrypoints.engine",
    "sglang.srt.entrypoints.openai.serving_completions",
    "sglang.srt.entrypoints.openai.serving_chat",
    "sglang.srt.managers.tokenizer_manager",
    "sglang.srt.managers.detokenizer_manager",
    "sglang.srt.managers.scheduler",
    "sglang.srt.managers.tp_worker",
    "sglang.srt.managers.scheduler_components.weight_updater",
    "sglang.srt.managers.scheduler_components.invariant_checker",
    "sglang.srt.model_executor.model_runner",
    "sglang.srt.model_executor.cuda_graph_config",
    "sglang.srt.model_loader.loader",
    "sglang.srt.models.llama",
    "sglang.srt.layers.attention.triton_backend",
    "sglang.srt.layers.attention.attention_registry",
    "sglang.srt.layers.sampler",
    "sglang.srt.layers.logits_processor",
    "sglang.srt.layers.layernorm",
    "sglang.srt.layers.activation",
    "sglang.srt.layers.rotary_embedding",
    "sglang.srt.layers.linear",
    "sglang.srt.layers.vocab_parallel_embedding",
    "sglang.srt.mem_cache.memory_pool",
    "sglang.srt.mem_cache.allocator",
    "sglang.srt.mem_cache.radix_cache",
    "sglang.srt.mem_cache.kv_cache_configurator",
    "sglang.srt.constrained.xgrammar_backend",
    "sglang.srt.utils.torch_memory_saver_adapter",
    "sglang.srt.distributed.parallel_state",
    "sglang.kernels.ops.memory.allocator",
    "sgl_kernel",  # its sm90 ops load on an H100/H200 (CUDA only)
    "torch_memory_saver",  # --enable-memory-saver
]


def _pretend_hopper_without_a_gpu() -> None:
    """sgl_kernel loads its ops for the GPU's compute capability at import; with no GPU
    it asks for the Blackwell build the payload drops. Import it as on a 9.0 GPU, so the
    Hopper library the payload keeps is the one checked (it must link)."""
    from types import SimpleNamespace
    from unittest import mock

    import torch

    if torch.cuda.is_available():
        return
    hopper = SimpleNamespace(major=9, minor=0)
    with mock.patch.multiple(
        torch.cuda, is_available=lambda: True, current_device=lambda: 0, get_device_properties=lambda _: hopper
    ):
        importlib.import_module("sgl_kernel")
    print("no GPU here: sgl_kernel imported as on a compute capability 9.0 GPU")


def main() -> int:
    failures: dict[str, list[str]] = {}
    others: list[tuple[str, str]] = []
    try:
        _pretend_hopper_without_a_gpu()
    except ModuleNotFoundError as e:
        failures[(e.name or "?").split(".")[0]] = ["sgl_kernel"]
    except Exception as e:
        others.append(("sgl_kernel (as on 9.0)", f"{type(e).__name__}: {e}".splitlines()[0][:300]))
    ok = import_all("sglang", MODULES, verbose="-v" in sys.argv, failures=failures, others=others)
    return 0 if ok else 1

if __name__ == "__main__":
    sys.exit(main())
