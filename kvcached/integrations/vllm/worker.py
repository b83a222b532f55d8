"""Worker-side patches: KV tensors over virtual memory, start-up memory, sleep.

The KV bytes. Every supported version makes the KV cache with ``torch.zeros`` of int8 in
one function (0.26: ``GPUModelRunner._allocate_kv_cache_tensors`` and Model Runner V2's
``gpu.attn_utils._allocate_kv_cache``, one buffer per layer; 0.29+: ``allocate_kv_cache``,
one buffer for all layers) and then cuts the attention backend's views out of those bytes.
We wrap that function and, for the duration of the call, give its module a ``torch``
whose ``zeros`` returns bytes of a kvcached arena instead (everything else is the real
torch). vLLM's own view code then runs unchanged, so shapes, strides and dtypes are
exactly the ones its kernels expect, and nothing is zero-filled (which would fault on
unmapped memory). One arena range per layer buffer; a page group is the same block
range in every layer. The profiling call (``is_profiling=True``) keeps ordinary memory.

Start-up memory. ``request_memory`` no longer refuses to start when other engines hold
GPU memory, and ``determine_available_memory`` reports the *virtual* KV size
(``KVCACHED_VIRTUAL_BYTES``, default the device's total memory) rounded to whole page
groups; the physical limit comes from the control plane.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
from collections.abc import Callable
from types import ModuleType
from typing import Any

from kvcached import envs, vmm
from kvcached.integrations.vllm import runtime

__all__ = ["patch_allocation_function", "patch_allocation_method", "patch_runner_init", "patch_worker"]

_log = logging.getLogger("kvcached.vllm")
_local = threading.local()  # .profiling: inside initialize_kv_cache(is_profiling=True)


class _TorchWithArenaZeros:
    """Stands in for the ``torch`` module inside one allocation call."""

    def __init__(self, real: ModuleType, zeros: Callable[..., Any]) -> None:
        self._real = real
        self.zeros = zeros

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def _page_bytes(block_bytes_per_range: int, granularity: int) -> int:
    want = max(envs.get("KVCACHED_PAGE_SIZE"), granularity)
    want = -(-want // granularity) * granularity
    return math.lcm(want, block_bytes_per_range)


def _refuse_parallel() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        raise RuntimeError(
            "kvcached: tensor/pipeline parallel (world size > 1) is not supported by this release; "
            "run with one GPU per engine or unset ENABLE_KVCACHED"
        )


def _geometry(kv_cache_config: Any) -> tuple[int, int, int]:
    """(number of layer ranges, bytes of one block in one range, bytes of one layer range).

    Raises:
        RuntimeError: a layout kvcached cannot back with page groups.
    """
    tensors = kv_cache_config.kv_cache_tensors
    num_blocks = kv_cache_config.num_blocks
    first = tensors[0]
    if hasattr(first, "shared_by"):  # 0.26: one buffer per layer (or per group of shared layers)
        sizes = {t.size for t in tensors}
        if len(sizes) != 1 or any(getattr(t, "block_stride", 0) for t in tensors):
            raise RuntimeError("kvcached: packed or unequal KV buffers (hybrid or cross-layer layouts) are not supported")
        size = sizes.pop()
        if size % num_blocks:
            raise RuntimeError(f"kvcached: KV buffer of {size} bytes is not a whole number of {num_blocks} blocks")
        return len(tensors), size // num_blocks, size
    # 0.29+: one backing buffer; layer l of block b at offset + l*layer_stride + b*block_stride.
    if len(tensors) != 1 or first.offset or first.layer_stride != first.block_stride * num_blocks:
        raise RuntimeError("kvcached: only the layer-outermost KV layout (LBNHC/LBHNC, one KV group) is supported")
    return len(first.layers), first.block_stride, first.layer_stride


def _arena_zeros(kv_cache_config: Any, model_name: str) -> Callable[..., Any]:
    """A ``zeros`` that hands out the arena's layer ranges in call order."""
    _refuse_parallel()
    import torch

    num_ranges, block_bytes, layer_bytes = _geometry(kv_cache_config)
    state: dict[str, Any] = {"next": 0}

    def zeros(size: Any, *args: Any, dtype: Any = None, device: Any = None, **kwargs: Any) -> Any:
        nbytes = int(size if not isinstance(size, tuple | list) else math.prod(size))
        dev = torch.device(device) if device is not None else torch.device("cpu")
        if dtype not in (None, torch.int8, torch.uint8) or args:
            return torch.zeros(size, *args, dtype=dtype, device=device, **kwargs)
        if "arena" not in state:
            if nbytes == layer_bytes:
                per_call = 1  # 0.26: one buffer per layer
            elif nbytes == layer_bytes * num_ranges:
                per_call = num_ranges  # 0.29+: one buffer for every layer
            else:
                raise RuntimeError(f"kvcached: unexpected KV buffer of {nbytes} bytes (layers of {layer_bytes})")
            backend = vmm.make_backend("cuda" if dev.type == "cuda" else "host", dev.index or 0)
            page = _page_bytes(block_bytes, backend.granularity)
            range_bytes = -(-layer_bytes // page) * page
            if per_call > 1 and range_bytes != layer_bytes:
                raise RuntimeError(
                    "kvcached: the KV buffer's layer stride is not a whole number of pages; "
                    "let kvcached size the cache (do not pass --num-gpu-blocks-override)"
                )
            arena = vmm.Arena(backend, num_ranges, range_bytes, page)
            arena.map([0])  # the null block (and padding reads) live in page group 0
            state.update(arena=arena, backend=backend, per_call=per_call)
            runtime.register_worker_kv(
                runtime.WorkerKV(
                    arena=arena,
                    backend=backend,
                    num_blocks=kv_cache_config.num_blocks,
                    blocks_per_page=page // block_bytes,
                    block_bytes=block_bytes * num_ranges,
                    model_name=model_name,
                )
            )
        arena, per_call = state["arena"], state["per_call"]
        if nbytes != layer_bytes * per_call or state["next"] >= num_ranges:
            raise RuntimeError(f"kvcached: unexpected extra KV buffer of {nbytes} bytes")
        r = state["next"]
        state["next"] += per_call
        return vmm.tensor_from_range(state["backend"], arena.range_addr(r), (nbytes,), torch.int8, owner=arena)

    return zeros


def _model_name(owner: Any) -> str:
    config = getattr(owner, "vllm_config", None) or getattr(owner, "model_config", None)
    model_config = getattr(config, "model_config", config)
    name = getattr(model_config, "served_model_name", None) or getattr(model_config, "model", None)
    if isinstance(name, list | tuple):
        name = name[0] if name else None
    return str(name or "vllm")


def _call_with_arena(fn: Callable[..., Any], torch_home: Any, kv_cache_config: Any, model_name: str,
                     *args: Any, **kwargs: Any) -> Any:
    if getattr(_local, "profiling", False):
        return fn(*args, **kwargs)
    real = torch_home.torch
    torch_home.torch = _TorchWithArenaZeros(real, _arena_zeros(kv_cache_config, model_name))
    try:
        return fn(*args, **kwargs)
    finally:
        torch_home.torch = real


def patch_allocation_method(runner_cls: Any, name: str, torch_home: Any) -> None:
    """Wrap ``runner_cls.<name>(self, kv_cache_config, ...)`` (0.26's V1 runner)."""
    original = getattr(runner_cls, name)

    @functools.wraps(original)
    def allocate(self: Any, kv_cache_config: Any, *args: Any, **kwargs: Any) -> Any:
        return _call_with_arena(original, torch_home, kv_cache_config, _model_name(self), self, kv_cache_config,
                                *args, **kwargs)

    setattr(runner_cls, name, allocate)


def patch_allocation_function(module: Any, name: str, torch_home: Any) -> None:
    """Replace ``module.<name>(kv_cache_config, ...)`` by name (MRV2 0.26; 0.29+ imports)."""
    original = getattr(module, name)
    if getattr(original, "__kvcached__", False):
        return

    @functools.wraps(original)
    def allocate(kv_cache_config: Any, *args: Any, **kwargs: Any) -> Any:
        name_hint = getattr(_local, "model_name", "vllm")
        return _call_with_arena(original, torch_home, kv_cache_config, name_hint, kv_cache_config, *args, **kwargs)

    allocate.__kvcached__ = True  # type: ignore[attr-defined]
    setattr(module, name, allocate)


def patch_runner_init(runner_cls: Any) -> None:
    """Mark the profiling KV init (ordinary memory) and remember the model name."""
    original = runner_cls.initialize_kv_cache

    @functools.wraps(original)
    def initialize_kv_cache(self: Any, *args: Any, **kwargs: Any) -> Any:
        profiling = bool(kwargs.get("is_profiling", args[1] if len(args) > 1 else False))
        _local.profiling, _local.model_name = profiling, _model_name(self)
        try:
            return original(self, *args, **kwargs)
        finally:
            _local.profiling = False

    runner_cls.initialize_kv_cache = initialize_kv_cache


def patch_worker(worker_module: Any) -> None:
    """Start-up memory and sleep on ``vllm.v1.worker.gpu_worker``."""
    worker_cls = worker_module.Worker

    def request_memory(init_snapshot: Any, cache_config: Any, *args: Any, **kwargs: Any) -> int:
        # What vLLM would ask for, without refusing when other engines hold memory. 0.34's
        # utilization may be unset, its default then depending on how the KV cache is sized.
        utilization = getattr(cache_config, "resolved_gpu_memory_utilization", None)
        return math.ceil(init_snapshot.total_memory * (utilization or cache_config.gpu_memory_utilization))

    worker_module.request_memory = request_memory

    original_available = worker_cls.determine_available_memory

    @functools.wraps(original_available)
    def determine_available_memory(self: Any) -> int:
        cache_config = self.cache_config
        if not cache_config.kv_cache_memory_bytes:
            cache_config.kv_cache_memory_bytes = _virtual_kv_bytes(self)
        return original_available(self)

    worker_cls.determine_available_memory = determine_available_memory

    original_sleep, original_wake = worker_cls.sleep, worker_cls.wake_up

    @functools.wraps(original_sleep)
    def sleep(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = original_sleep(self, *args, **kwargs)
        pages = runtime.current_pages()
        if pages is not None:
            pages.suspend()
        return result

    @functools.wraps(original_wake)
    def wake_up(self: Any, tags: Any = None, *args: Any, **kwargs: Any) -> Any:
        pages = runtime.current_pages()
        if pages is not None and (tags is None or "kv_cache" in tags):
            pages.resume()
        return original_wake(self, tags, *args, **kwargs)

    worker_cls.sleep, worker_cls.wake_up = sleep, wake_up
    _patch_warmup(worker_cls)


def _patch_warmup(worker_cls: Any) -> None:
    """Back the blocks that start-up warm-up invents.

    Kernel warm-up (Model Runner V2's ``warmup_kernels``, 0.33's block zeroer) runs
    fake requests through ``Worker.execute_model`` with block ids it picks itself
    (1, 2, 3, ...) before the scheduler and its block pool exist. While no block pool
    owns the arena, each such step first maps the page groups of the block ids it
    carries; when warm-up ends they are unmapped again (page group 0 stays).
    """
    original_warm, original_execute = worker_cls.compile_or_warm_up_model, worker_cls.execute_model

    @functools.wraps(original_execute)
    def execute_model(self: Any, scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
        kv = runtime.worker_kv()
        if kv is not None and kv.pages is None and scheduler_output is not None:
            pages = sorted({b // kv.blocks_per_page for b in _block_ids(scheduler_output)} - set(kv.arena.mapped_pages()))
            if pages:
                kv.arena.map(pages)
        return original_execute(self, scheduler_output, *args, **kwargs)

    @functools.wraps(original_warm)
    def compile_or_warm_up_model(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return original_warm(self, *args, **kwargs)
        finally:
            kv = runtime.worker_kv()
            if kv is not None and kv.pages is None:
                import torch

                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                extra = [p for p in kv.arena.mapped_pages() if p != 0]
                if extra:
                    kv.arena.unmap(extra)

    worker_cls.execute_model, worker_cls.compile_or_warm_up_model = execute_model, compile_or_warm_up_model


def _block_ids(scheduler_output: Any) -> set[int]:
    """Every block id a ``SchedulerOutput`` hands to the worker."""
    ids: set[int] = set()

    def add(groups: Any) -> None:
        for group in groups or ():
            ids.update(group or ())

    for req in getattr(scheduler_output, "scheduled_new_reqs", None) or ():
        add(getattr(req, "block_ids", None))
    cached = getattr(scheduler_output, "scheduled_cached_reqs", None)
    for groups in getattr(cached, "new_block_ids", None) or ():
        add(groups)
    return ids


def _virtual_kv_bytes(worker: Any) -> int:
    """The KV size to report: virtual capacity, a whole number of page groups."""
    import torch

    virtual = envs.get("KVCACHED_VIRTUAL_BYTES")
    if not virtual:
        virtual = torch.cuda.mem_get_info(worker.device)[1] if torch.cuda.is_available() else 8 << 30
    specs = worker.model_runner.get_kv_cache_spec()
    pages = [spec.page_size_bytes for spec in specs.values()]
    if not pages:
        return int(virtual)
    per_block = sum(pages)
    granularity = 2 << 20
    blocks_per_page = max(_page_bytes(p, granularity) // p for p in set(pages))
    num_blocks = virtual // per_block // blocks_per_page * blocks_per_page
    _log.info("kvcached: virtual KV cache of %d blocks (%.1f GiB)", num_blocks, num_blocks * per_block / 2**30)
    return int(num_blocks * per_block)
