"""The patch functions for SGLang 0.5.23 (armed by :func:`..install`). Each takes the
just-imported SGLang module, replaces what it must, and marks what it did so a second
call is a no-op."""

from __future__ import annotations

import dataclasses
import functools
import inspect
from types import ModuleType
from typing import Any

from kvcached import envs
from kvcached.integrations.sglang.elastic import live_stores

__all__ = [
    "patch_configurator",
    "patch_leak_check",
    "patch_platform_allocator",
    "patch_platform_pools",
    "patch_radix_cache",
    "patch_release_resume",
    "profile_available_bytes",
]

_DONE = "_kvcached_patched"


def _once(target: Any) -> bool:
    """True the first time for ``target`` (marking it), False after. A bound method cannot
    be marked: its replacement carries the mark instead."""
    if getattr(target, _DONE, False):
        return False
    if not inspect.ismethod(target):
        setattr(target, _DONE, True)
    return True


def patch_platform_pools(memory_pool: ModuleType) -> None:
    """Answer ``current_platform.get_kv_pool_cls`` with the elastic MHA / MLA pools."""
    from sglang.srt.platforms import current_platform

    from kvcached.integrations.sglang.v0_5_23.pools import ElasticMHATokenToKVPool, ElasticMLATokenToKVPool

    if not _once(current_platform.get_kv_pool_cls):
        return
    original = current_platform.get_kv_pool_cls
    elastic = {"mha": ElasticMHATokenToKVPool, "mla": ElasticMLATokenToKVPool}

    @functools.wraps(original)
    def get_kv_pool_cls(*, kind: str) -> type | None:
        own = original(kind=kind)
        if own is not None or kind not in elastic:
            raise NotImplementedError(
                f"kvcached: the {type(current_platform).__name__} platform's {kind!r} KV pool "
                f"({getattr(own, '__name__', 'in-tree')}) has no kvcached version; unset ENABLE_KVCACHED"
            )
        return elastic[kind]

    setattr(get_kv_pool_cls, _DONE, True)
    current_platform.get_kv_pool_cls = get_kv_pool_cls


def patch_platform_allocator(paged: ModuleType) -> None:
    """Answer ``current_platform.get_paged_allocator_cls`` with the elastic paged allocator."""
    from sglang.srt.platforms import current_platform

    if not _once(current_platform.get_paged_allocator_cls):
        return
    own = current_platform.get_paged_allocator_cls()
    if own is not None:
        raise NotImplementedError(
            f"kvcached: the {type(current_platform).__name__} platform's paged allocator "
            f"{own.__name__} has no kvcached version; unset ENABLE_KVCACHED"
        )

    def get_paged_allocator_cls() -> type:
        # Imported when first asked: this patch runs while memory_pool may still be importing.
        from kvcached.integrations.sglang.v0_5_23.allocators import ElasticPagedTokenToKVPoolAllocator

        return ElasticPagedTokenToKVPoolAllocator

    setattr(get_paged_allocator_cls, _DONE, True)
    current_platform.get_paged_allocator_cls = get_paged_allocator_cls


def patch_configurator(configurator: ModuleType) -> None:
    """Page-size-1 allocator (built by name, no seam) and start-up capacity profiling."""
    from kvcached.integrations.sglang.v0_5_23.allocators import ElasticTokenToKVPoolAllocator

    if not _once(configurator):
        return
    configurator.TokenToKVPoolAllocator = ElasticTokenToKVPoolAllocator  # type: ignore[attr-defined]
    cls = configurator.KVCacheConfigurator
    original = cls._profile_available_bytes

    @functools.wraps(original)
    def _profile_available_bytes(self: Any, pre_model_load_memory: int) -> int:
        if getattr(self, "mambaish_config", None) is not None:
            raise NotImplementedError("kvcached: hybrid Mamba models are not supported; unset ENABLE_KVCACHED")
        return profile_available_bytes(self.device, getattr(self, "gpu_id", 0))

    cls._profile_available_bytes = _profile_available_bytes


def profile_available_bytes(device: object, gpu_id: int = 0) -> int:
    """The KV capacity SGLang sizes its slot space for: the device's free memory now,
    after weights, less ``KVCACHED_HEADROOM`` on a GPU — no fixed fraction held back.
    Only address space is sized by it; physical memory follows the allocations."""
    from kvcached import vmm

    if str(device).startswith("cuda"):
        backend = vmm.make_backend("cuda", gpu_id)
        headroom_bytes = int(envs.get("KVCACHED_HEADROOM"))
    else:
        backend = vmm.make_backend("host")
        headroom_bytes = 0
    free_bytes = int(backend.mem_info()[0]) - headroom_bytes
    if free_bytes <= 0:
        raise MemoryError(f"kvcached: no device memory left for the KV cache beyond the {headroom_bytes}-byte headroom")
    return free_bytes


def patch_leak_check(checker: ModuleType) -> None:
    """Teach the scheduler's conservation check that free slots are what the elastic
    allocator does not hold, whether or not memory is mapped under them now."""
    cls = checker.SchedulerInvariantChecker
    if not _once(cls):
        return
    original = cls._check_full_pool

    @functools.wraps(original)
    def _check_full_pool(self: Any, ps: Any, uncached: int = 0) -> Any:
        index_free = getattr(self.token_to_kv_pool_allocator, "index_free_tokens", None)
        if index_free is not None:
            ps = dataclasses.replace(ps, full_available_size=index_free())
        return original(self, ps, uncached)

    cls._check_full_pool = _check_full_pool


def patch_release_resume(weight_updater: ModuleType) -> None:
    """``release_memory_occupation`` / ``resume_memory_occupation`` with the ``kv_cache``
    tag (or no tag) unmap every KV page group but the pinned one / allow mapping again."""
    from sglang.srt.constants import GPU_MEMORY_TYPE_KV_CACHE

    cls = weight_updater.SchedulerWeightUpdaterManager
    if not _once(cls):
        return
    release, resume = cls.release_memory_occupation, cls.resume_memory_occupation

    def _touches_kv(recv_req: Any) -> bool:
        tags = getattr(recv_req, "tags", None)
        return not tags or GPU_MEMORY_TYPE_KV_CACHE in tags

    @functools.wraps(release)
    def release_memory_occupation(self: Any, recv_req: Any) -> Any:
        out = release(self, recv_req)  # flushes the cache: every slot is back in the pool
        if _touches_kv(recv_req):
            for store in live_stores():
                store.release()
        return out

    @functools.wraps(resume)
    def resume_memory_occupation(self: Any, recv_req: Any) -> Any:
        if _touches_kv(recv_req):
            for store in live_stores():
                store.resume()
        return resume(self, recv_req)

    cls.release_memory_occupation = release_memory_occupation
    cls.resume_memory_occupation = resume_memory_occupation


def patch_radix_cache(radix_cache: ModuleType) -> None:
    """Keep the radix cache's evictable (unreferenced) prefix under
    ``KVCACHED_PREFIX_CACHE_MAX`` bytes (0: no bound but memory), evicting SGLang's own
    way (least recently used leaves) after each insert."""
    cls = radix_cache.RadixCache
    if not _once(cls):
        return
    original = cls.insert

    @functools.wraps(original)
    def insert(self: Any, params: Any) -> Any:
        result = original(self, params)
        bound_bytes = int(envs.get("KVCACHED_PREFIX_CACHE_MAX"))
        if bound_bytes:
            enforce_prefix_bound(self, bound_bytes)
        return result

    cls.insert = insert


def enforce_prefix_bound(tree: Any, bound_bytes: int) -> int:
    """Evict from ``tree`` until its evictable tokens fit ``bound_bytes``; return the
    tokens evicted (0 when the tree is not on a kvcached pool)."""
    from sglang.srt.mem_cache.base_prefix_cache import EvictParams

    store = getattr(tree.token_to_kv_pool_allocator.get_kvcache(), "kvcached_store", None)
    if store is None:
        return 0
    slot_bytes = store.pool.block_bytes // store.shape.page_size
    excess_tokens = tree.evictable_size() - bound_bytes // slot_bytes
    if excess_tokens <= 0:
        return 0
    before = tree.evictable_size()
    tree.evict(EvictParams(num_tokens=excess_tokens))
    return before - tree.evictable_size()
