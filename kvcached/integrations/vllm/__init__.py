"""vLLM with kvcached: activated by the import hook, no engine changes.

:func:`activate` runs when ``vllm`` is imported in a process where ``ENABLE_KVCACHED`` is
true. It checks the version (an unsupported one stops the engine, naming the supported
range) and arms one patch per module, each applied the moment vLLM's module finishes
importing:

===============================================  ==============================================
``vllm.v1.core.kv_cache_coordinator``             ``BlockPool`` → :class:`ElasticBlockPool`
``vllm.v1.core.sched.scheduler``                  one scheduler step holds the pool's lock;
                                                  blocks move together before it (compaction)
``vllm.v1.core.kv_cache_manager``                 new requests wait while over the fair share
``vllm.v1.worker.gpu_model_runner``               KV bytes from a kvcached arena (V1 runner);
                                                  moved blocks' rows rewritten
``vllm.v1.worker.gpu.attn_utils``                 the same for Model Runner V2
``vllm.v1.worker.gpu.model_runner``               moved blocks' rows rewritten (Model Runner V2)
``vllm.v1.worker.gpu_worker``                     start-up memory, sleep / wake-up
``vllm.config.vllm``                              vLLM's own extensible KV cache off (0.34+)
===============================================  ==============================================
"""

from __future__ import annotations

import functools
from types import ModuleType
from typing import Any

from kvcached.integrations.hooks import when_imported
from kvcached.integrations.versions import parse_version, require_supported

__all__ = ["activate", "patch_block_pool_module"]


def activate(vllm: ModuleType) -> None:
    """Arm the vLLM patches.

    Raises:
        RuntimeError: this vLLM version is outside the supported range.
    """
    version = getattr(vllm, "__version__", "unknown")
    require_supported("vllm", "vLLM", version)
    release = parse_version(version)
    when_imported("vllm.v1.core.kv_cache_coordinator", _patch_coordinator)
    when_imported("vllm.v1.core.sched.scheduler", _patch_scheduler)
    when_imported("vllm.v1.core.kv_cache_manager", _patch_kv_cache_manager)
    when_imported("vllm.v1.worker.gpu_worker", _patch_gpu_worker)
    when_imported("vllm.v1.worker.gpu.model_runner", _patch_mrv2_runner)
    if release >= (0, 34):
        when_imported("vllm.config.vllm", _patch_config)
    if release < (0, 29):
        when_imported("vllm.v1.worker.gpu_model_runner", _patch_runner_026)
        when_imported("vllm.v1.worker.gpu.attn_utils", _patch_mrv2_026)
    else:
        when_imported("vllm.v1.worker.gpu_model_runner", _patch_runner_029)
        when_imported("vllm.v1.worker.gpu.attn_utils", _patch_mrv2_029)


def patch_block_pool_module(module: ModuleType) -> None:
    """Also replace ``vllm.v1.core.block_pool.BlockPool`` itself, so code that builds the
    pool directly (vLLM's own unit tests) gets the elastic one. Not done in engines: other
    pools (CPU offload) subclass or build ``BlockPool`` and must stay as they are."""
    from kvcached.integrations.vllm.block_pool import ElasticBlockPool

    module.BlockPool = ElasticBlockPool  # type: ignore[attr-defined]


def _patch_coordinator(module: ModuleType) -> None:
    from kvcached.integrations.vllm.block_pool import ElasticBlockPool

    module.BlockPool = ElasticBlockPool  # type: ignore[attr-defined]


def _patch_config(module: ModuleType) -> None:
    """vLLM 0.34's extensible KV cache (on by default on CUDA) backs the KV tensors with
    vLLM's own driver mappings, sized after warm-up; kvcached backs them instead. With
    kvcached it is off; asking for it is refused at start, naming the two ways out."""
    config_cls = module.VllmConfig
    original = config_cls._resolve_extensible_kv_cache

    @functools.wraps(original)
    def resolve(self: Any) -> None:
        cache_config = self.cache_config
        if not cache_config._extensible_kv_cache_resolved:
            if cache_config.enable_extensible_kv_cache:
                raise ValueError(
                    "kvcached backs the KV cache with its own virtual memory, so vLLM's extensible KV cache "
                    "cannot be on too; drop --enable-extensible-kv-cache or unset ENABLE_KVCACHED"
                )
            cache_config.enable_extensible_kv_cache = False  # vLLM's checks still run on it
        original(self)

    config_cls._resolve_extensible_kv_cache = resolve


def _patch_scheduler(module: ModuleType) -> None:
    """One step holds the pool's lock; before it, blocks may move (:mod:`.compaction`)."""
    from kvcached.integrations.vllm import compaction

    scheduler_cls = module.Scheduler
    original = scheduler_cls.schedule

    @functools.wraps(original)
    def schedule(self: Any, *args: Any, **kwargs: Any) -> Any:
        lock = getattr(getattr(self.kv_cache_manager, "block_pool", None), "kv_lock", None)
        if lock is None:
            return original(self, *args, **kwargs)
        with lock:
            moves = compaction.before_step(self)
            output = original(self, *args, **kwargs)
            if moves is not None:
                compaction.attach(output, moves)
            return output

    scheduler_cls.schedule = schedule


def _patch_kv_cache_manager(module: ModuleType) -> None:
    """While another engine on the GPU is refused memory and this one holds more than its
    fair share, ``allocate_slots`` answers ``None`` for requests that are not running yet
    (they wait, as on a full cache); running requests keep growing. So a peak borrows
    idle engines' memory but gives it back as its requests finish once they need it.
    A request refused for want of budget is what tells the other engines (``note_refused``).
    It also tells the block pool whose blocks it is about to hand out (``allocating_for``,
    a hint for placement: a stale one only moves where a block goes)."""
    from vllm.v1.request import RequestStatus

    manager_cls = module.KVCacheManager
    original = manager_cls.allocate_slots

    running = RequestStatus.RUNNING

    # Called once per scheduled request per step: kept to a few attribute reads.
    @functools.wraps(original)
    def allocate_slots(self: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
        kv = getattr(getattr(self, "block_pool", None), "kv", None)
        if kv is None:
            return original(self, request, *args, **kwargs)
        if kv.share_blocks is not None and getattr(request, "status", None) != running and not kv.admits_new():
            return None
        pool = self.block_pool
        if pool.req_to_blocks is None:  # once: with one KV cache group, its requests' blocks
            managers: tuple[Any, ...] = getattr(getattr(self, "coordinator", None), "single_type_managers", ())
            pool.req_to_blocks = managers[0].req_to_blocks if len(managers) == 1 else {}
        pool.allocating_for = request.request_id
        blocks = original(self, request, *args, **kwargs)
        if blocks is None:
            kv.note_refused()
        return blocks

    manager_cls.allocate_slots = allocate_slots


def _patch_gpu_worker(module: ModuleType) -> None:
    from kvcached.integrations.vllm.worker import patch_worker

    patch_worker(module)


def _patch_runner_026(module: ModuleType) -> None:
    from kvcached.integrations.vllm.worker import patch_allocation_method, patch_runner_init

    patch_runner_init(module.GPUModelRunner)
    patch_allocation_method(module.GPUModelRunner, "_allocate_kv_cache_tensors", module)
    _patch_step_update(module.GPUModelRunner, "_update_states", "rewrite_v1")


def _patch_mrv2_026(module: ModuleType) -> None:
    from kvcached.integrations.vllm.worker import patch_allocation_function

    patch_allocation_function(module, "_allocate_kv_cache", module)


def _patch_runner_029(module: ModuleType) -> None:
    import vllm.v1.worker.utils as worker_utils

    from kvcached.integrations.vllm.worker import patch_allocation_function, patch_runner_init

    patch_runner_init(module.GPUModelRunner)
    patch_allocation_function(module, "allocate_kv_cache", worker_utils)
    _patch_step_update(module.GPUModelRunner, "_update_states", "rewrite_v1")


def _patch_mrv2_029(module: ModuleType) -> None:
    import vllm.v1.worker.utils as worker_utils

    from kvcached.integrations.vllm.worker import patch_allocation_function

    patch_allocation_function(module, "allocate_kv_cache", worker_utils)


def _patch_mrv2_runner(module: ModuleType) -> None:
    from kvcached.integrations.vllm.worker import patch_runner_init

    patch_runner_init(module.GPUModelRunner)
    _patch_step_update(module.GPUModelRunner, "update_requests", "rewrite_v2")


def _patch_step_update(runner_cls: Any, name: str, rewrite_name: str) -> None:
    """Wrap the runner method that applies a step's ``SchedulerOutput`` (and queues vLLM's
    block copies): moved blocks' rows are rewritten before it, the copy marked after."""
    from kvcached.integrations.vllm import compaction

    original = getattr(runner_cls, name)
    rewrite = getattr(compaction, rewrite_name)

    @functools.wraps(original)
    def update(self: Any, scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
        moves = rewrite(self, scheduler_output)
        result = original(self, scheduler_output, *args, **kwargs)
        compaction.copy_queued(moves)
        return result

    setattr(runner_cls, name, update)
