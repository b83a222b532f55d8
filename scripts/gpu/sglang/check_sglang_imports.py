#!/usr/bin/env python3
"""Import the SGLang 0.5.17 modules that `python -m sglang.launch_server` walks for a dense
Llama on the Triton attention backend (dummy weights, memory saver on), and report any
that fail.

Exit status 0 when every module imported; otherwise 1, with one line per failure,
grouped by the missing top-level package where that is the cause.

Run on the GPU machine after stage_sglang.sh (PYTHONPATH=/tmp/site-sglang) and here in
the image-like Python 3.12 venv (scripts/gpu/sglang/simulate_cpu.sh). Without a GPU the
imports run as on one H200 (torch.cuda reports a compute capability 9.0 device), so
SGLang takes its CUDA-only module-level branches here too: `if is_cuda(): from
flashinfer.sampling import ...` in the sampler, sgl_kernel's sm90 ops, and the like.

    check_sglang_imports.py [-v]
"""

from __future__ import annotations

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
    "flashinfer.sampling",  # imported by the sampler on CUDA (no FlashInfer kernel runs)
    "flashinfer.prefill",  # imported by attention/vision.py on CUDA
    "torch_memory_saver",  # --enable-memory-saver
]


def _as_on_a_hopper_gpu():
    """With no GPU, make torch.cuda report one compute capability 9.0 device while the
    modules import: SGLang's `is_cuda()` branches then import what they would on an
    H100/H200 (FlashInfer, ...), and sgl_kernel loads the sm90 ops the payload keeps (they
    must link) instead of asking for the dropped Blackwell build. Nothing runs on it."""
    from contextlib import nullcontext
    from types import SimpleNamespace
    from unittest import mock

    import torch

    if torch.cuda.is_available():
        return nullcontext()
    print("no GPU here: importing as on a compute capability 9.0 GPU (SGLang's CUDA branches taken)")
    h200 = SimpleNamespace(major=9, minor=0, name="NVIDIA H200", total_memory=140 << 30, multi_processor_count=132)
    return mock.patch.multiple(
        torch.cuda, is_available=lambda: True, device_count=lambda: 1, current_device=lambda: 0,
        get_device_properties=lambda *_: h200, get_device_capability=lambda *_: (9, 0),
        get_device_name=lambda *_: h200.name,
    )


def main() -> int:
    with _as_on_a_hopper_gpu():
        ok = import_all("sglang", MODULES, verbose="-v" in sys.argv)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
