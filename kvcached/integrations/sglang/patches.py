"""The patches both supported SGLang versions (0.5.17, 0.5.23) take the same way. Each
takes the just-imported SGLang module (or class), replaces what it must, and marks what
it did so a second call is a no-op. The version packages (``v0_5_17``, ``v0_5_23``) arm
them next to their own seam patches."""

from __future__ import annotations

import dataclasses
import functools
import inspect
from types import ModuleType
from typing import Any

from kvcached import envs
from kvcached.integrations.hooks import when_imported
from kvcached.integrations.sglang.elastic import elastic_store_of, live_stores

__all__ = [
    "DONE_MARK",
    "PageAwarePriority",
    "arm_shared",
    "check_pool_choice",
    "enforce_prefix_bound",
    "mark_once",
    "patch_configurator",
    "patch_leak_check",
    "patch_radix_cache",
    "patch_release_resume",
    "profile_available_bytes",
]

DONE_MARK = "_kvcached_patched"


def arm_shared() -> None:
    """Arm the patches every supported version takes the same way: the leak check, release /
    resume of ``kv_cache``, and the radix cache's byte bound."""
    when_imported("sglang.srt.managers.scheduler_components.invariant_checker", patch_leak_check)
    when_imported("sglang.srt.managers.scheduler_components.weight_updater", patch_release_resume)
    when_imported("sglang.srt.mem_cache.radix_cache", patch_radix_cache)


def mark_once(target: Any) -> bool:
    """True the first time for ``target`` (marking it), False after. A bound method cannot
    be marked: its replacement carries the mark instead."""
    if getattr(target, DONE_MARK, False):
        return False
    if not inspect.ismethod(target):
        setattr(target, DONE_MARK, True)
    return True


def patch_configurator(cls: type) -> None:
    """On ``KVCacheConfigurator``: start-up capacity from free device memory (no fixed
    fraction); refuse speculative decoding and the page-major layout up front, and check
    the KV pool SGLang built before its allocator is (:func:`check_pool_choice`)."""
    if not mark_once(cls):
        return
    profile, build = cls._profile_available_bytes, cls._build_token_to_kv_pool  # type: ignore[attr-defined]

    @functools.wraps(profile)
    def _profile_available_bytes(self: Any, pre_model_load_memory: int) -> int:
        if getattr(self, "mambaish_config", None) is not None:
            raise NotImplementedError("kvcached: hybrid Mamba models are not supported; unset ENABLE_KVCACHED")
        return profile_available_bytes(self.device, getattr(self, "gpu_id", 0))

    @functools.wraps(build)
    def _build_token_to_kv_pool(self: Any, *args: Any, **kwargs: Any) -> Any:
        if getattr(self, "is_draft_worker", False):
            raise NotImplementedError(
                "kvcached: speculative decoding is not supported (the draft model's KV pool would share the "
                "target's allocator, which maps only the target's memory); unset ENABLE_KVCACHED"
            )
        from sglang.srt.runtime_context import get_memory

        if getattr(get_memory(), "enable_page_major_kv_layout", False):
            raise NotImplementedError("kvcached: the page-major KV layout is not supported; unset ENABLE_KVCACHED")
        before = set(live_stores())
        pool = build(self, *args, **kwargs)
        check_pool_choice(pool, before)
        return pool

    cls._profile_available_bytes = _profile_available_bytes  # type: ignore[attr-defined]
    cls._build_token_to_kv_pool = _build_token_to_kv_pool  # type: ignore[attr-defined]


def check_pool_choice(pool: Any, stores_before: set[Any]) -> None:
    """Stop the engine unless ``pool`` is one of kvcached's (plain MHA or MLA).

    SGLang picks a KV pool per model and configuration (sliding-window composites,
    hybrid linear attention, FP4/MXFP8, DSA, DeepSeek-V4, ...); any pool that is not
    kvcached's own would be served without kvcached, or — for composites holding
    kvcached pools — by allocators that do not map memory. Stores made for such a pool
    (``stores_before``: the live ones before it was built) are closed first.

    Raises:
        NotImplementedError: naming SGLang's pool class.
    """
    if elastic_store_of(pool) is not None:
        return
    for store in set(live_stores()) - stores_before:
        store.close()
    raise NotImplementedError(
        f"kvcached: SGLang chose its {type(pool).__name__} KV pool for this model and configuration; "
        "kvcached serves the plain MHA and MLA pools only; unset ENABLE_KVCACHED to run it without kvcached"
    )


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
    if not mark_once(cls):
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
    tag (or no tag): every KV page group is unmapped, the pinned one too, so a released
    engine holds no KV memory / the pinned group is mapped again and mapping allowed."""
    from sglang.srt.constants import GPU_MEMORY_TYPE_KV_CACHE

    cls = weight_updater.SchedulerWeightUpdaterManager
    if not mark_once(cls):
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
    :func:`prefix_bound_bytes` (0: no bound but memory), evicting page-aware after each
    insert (:func:`enforce_prefix_bound`). SGLang's own evictions (to make room) keep
    its order."""
    cls = radix_cache.RadixCache
    if not mark_once(cls):
        return
    original = cls.insert

    @functools.wraps(original)
    def insert(self: Any, params: Any) -> Any:
        result = original(self, params)
        bound_bytes = prefix_bound_bytes(self)
        if bound_bytes:
            enforce_prefix_bound(self, bound_bytes)
        return result

    cls.insert = insert


def prefix_bound_bytes(tree: Any) -> int:
    """The radix cache's bound: ``KVCACHED_PREFIX_CACHE_MAX``; unset (0) while the engine
    shares a GPU budget with others, ``KVCACHED_IDLE_CACHE_MAX`` — SGLang evicts only when
    an allocation fails, so an unbounded cache would hold memory a peer is refused."""
    bound_bytes = int(envs.get("KVCACHED_PREFIX_CACHE_MAX"))
    if bound_bytes:
        return bound_bytes
    store = getattr(tree.token_to_kv_pool_allocator.get_kvcache(), "kvcached_store", None)
    if store is not None and store.shares_budget():
        return int(envs.get("KVCACHED_IDLE_CACHE_MAX"))
    return 0


class PageAwarePriority:
    """An eviction order for SGLang's radix cache over a kvcached pool: leaves whose slots
    sit on the least-held page groups go first, so whole groups empty and are unmapped;
    SGLang's own priority (LRU by default) breaks ties. Occupancy is read once, when
    built (SGLang builds its eviction heap once per ``evict``).

    Args:
        own: the tree's eviction strategy (``get_priority(node)``).
        allocator: the tree's kvcached allocator (``held_blocks_per_group()``,
            ``slots_per_group``).
    """

    def __init__(self, own: Any, allocator: Any) -> None:
        self._own = own
        self._held = allocator.held_blocks_per_group()
        self._slots_per_group = allocator.slots_per_group

    def get_priority(self, node: Any) -> tuple[float, Any]:
        import torch

        slots = node.value.to("cpu", torch.int64)
        if slots.numel() == 0:
            return (0.0, self._own.get_priority(node))
        groups = torch.unique(slots // self._slots_per_group)
        return (float(self._held[groups].float().mean()), self._own.get_priority(node))


def enforce_prefix_bound(tree: Any, bound_bytes: int) -> int:
    """Evict from ``tree`` until its evictable tokens fit ``bound_bytes``, page-aware
    (:class:`PageAwarePriority`); return the tokens evicted (0 when the tree is not on a
    kvcached pool)."""
    from sglang.srt.mem_cache.base_prefix_cache import EvictParams

    allocator = tree.token_to_kv_pool_allocator
    store = getattr(allocator.get_kvcache(), "kvcached_store", None)
    if store is None or not hasattr(allocator, "held_blocks_per_group"):
        return 0
    slot_bytes = store.pool.block_bytes // store.shape.page_size
    excess_tokens = tree.evictable_size() - bound_bytes // slot_bytes
    if excess_tokens <= 0:
        return 0
    before = tree.evictable_size()
    own = tree.eviction_strategy
    tree.eviction_strategy = PageAwarePriority(own, allocator)
    try:
        tree.evict(EvictParams(num_tokens=excess_tokens))
    finally:
        tree.eviction_strategy = own
    return before - tree.evictable_size()
