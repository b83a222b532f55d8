#!/usr/bin/env python3
"""Import the vLLM modules that `vllm serve` walks through for a dense Llama on
the Triton attention backend (dummy weights, multiprocessing executor, Model
Runner V1 and V2), and report any that fail.

Exit status 0 when every module imported; otherwise 1, with one line per
failure, grouped by the missing top-level package where that is the cause.

Run on the GPU machine after stage_vllm.sh (PYTHONPATH=/tmp/site) and here in a
scratch venv (scripts/gpu/simulate_cpu.sh) with a stub libcuda.so.1; there, the
CUDA-only branches (fa_utils) are taken only with the fake-H100 plugin
(FAKECUDA=1, scripts/gpu/cpu_sim on PYTHONPATH).

    check_vllm_imports.py [-v] [--app MODEL_DIR]

--app also builds the OpenAI server's FastAPI app for MODEL_DIR the way
`vllm serve` does (with VLLM_SERVER_DEV_MODE routes: /sleep, /wake_up), which
imports the routers' lazy dependencies (metrics instrumentator, SageMaker
standards, ...), and lists the routes.
"""

from __future__ import annotations

import os
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from serving import import_all

MODULES = [
    "vllm",
    "vllm.envs",
    "vllm.platforms.cuda",
    "vllm.entrypoints.cli.main",
    "vllm.entrypoints.cli.serve",
    "vllm.entrypoints.openai.api_server",
    "vllm.entrypoints.openai.chat_completion.serving",
    "vllm.entrypoints.openai.completion.serving",
    "vllm.entrypoints.launcher",
    "vllm.entrypoints.chat_utils",
    "vllm.engine.arg_utils",
    "vllm.config",
    "vllm.transformers_utils.config",
    "vllm.tokenizers.hf",
    "vllm.tokenizers.registry",
    "vllm.renderers.hf",
    "vllm.renderers.registry",
    "vllm.tool_parsers",
    "vllm.reasoning",
    "vllm.v1.engine.async_llm",
    "vllm.v1.engine.core",
    "vllm.v1.engine.core_client",
    "vllm.v1.engine.input_processor",
    "vllm.v1.engine.output_processor",
    "vllm.v1.engine.detokenizer",
    "vllm.v1.executor.multiproc_executor",
    "vllm.v1.executor.uniproc_executor",
    "vllm.v1.core.sched.scheduler",
    "vllm.v1.core.kv_cache_manager",
    "vllm.v1.core.kv_cache_coordinator",
    "vllm.v1.core.block_pool",
    "vllm.v1.core.kv_cache_utils",
    "vllm.v1.structured_output",
    "vllm.v1.worker.gpu_worker",
    "vllm.v1.worker.gpu_model_runner",
    "vllm.v1.worker.gpu.model_runner",
    "vllm.v1.worker.gpu.attn_utils",
    "vllm.v1.attention.backends.triton_attn",
    "vllm.v1.attention.backends.fa_utils",  # CUDA: needs vllm_flash_attn (FA3 .so)
    "vllm.model_executor.layers.attention",  # llama.py -> mm_encoder_attention -> fa_utils
    "vllm.v1.attention.selector",
    "vllm.v1.sample.sampler",
    "vllm.vllm_flash_attn",
    "vllm.model_executor.models.llama",
    "vllm.model_executor.models.registry",
    "vllm.model_executor.model_loader",
    "vllm.model_executor.model_loader.dummy_loader",
    "vllm.model_executor.layers.layernorm",
    "vllm.model_executor.layers.activation",
    "vllm.model_executor.layers.rotary_embedding",
    "vllm.model_executor.layers.linear",
    "vllm.model_executor.layers.vocab_parallel_embedding",
    "vllm.model_executor.layers.logits_processor",
    "vllm.compilation.backends",
    "vllm.compilation.wrapper",
    "vllm.compilation.monitor",
    "vllm.distributed.parallel_state",
    "vllm.distributed.device_communicators.cuda_communicator",
    "vllm.distributed.device_communicators.shm_broadcast",
    "vllm.device_allocator.cumem",
    "vllm.usage.usage_lib",
    # lazily imported on the default path (kept in the payload on purpose)
    "depyf",  # compilation/wrapper.py, only when a compiled graph mutates buffers
    "setproctitle",  # utils/system_utils.py, process titles (guarded)
]


def main() -> int:
    bad = not import_all("vllm", MODULES, verbose="-v" in sys.argv)
    if "--app" in sys.argv:
        model = sys.argv[sys.argv.index("--app") + 1]
        try:
            print(build_app_routes(model))
        except Exception:
            traceback.print_exc()
            bad = True
    return 1 if bad else 0


def build_app_routes(model: str) -> str:
    os.environ["VLLM_SERVER_DEV_MODE"] = "1"
    import vllm.envs as envs

    if hasattr(envs, "disable_envs_cache"):
        envs.disable_envs_cache()
    from vllm.entrypoints.openai.api_server import build_app
    from vllm.entrypoints.openai.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser())
    args = parser.parse_args([model, "--load-format", "dummy", "--attention-backend", "TRITON_ATTN"])
    validate_parsed_serve_args(args)
    app = build_app(args, supported_tasks=("generate",))
    paths = sorted({getattr(r, "path", "") for r in app.routes})
    keep = [p for p in paths if p.startswith(("/v1/c", "/v1/models", "/health", "/metrics", "/sleep", "/wake", "/is_"))]
    return f"app: {len(paths)} routes, e.g. {keep}"


if __name__ == "__main__":
    sys.exit(main())
