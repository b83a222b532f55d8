"""SGLang 0.5.23's own seams: the platform hooks ``current_platform.get_kv_pool_cls`` and
``get_paged_allocator_cls`` (honoured at every construction site), and the page-size-1
allocator, which the configurator still builds by name."""

from __future__ import annotations

import functools
from types import ModuleType

from kvcached.integrations.sglang import patches

__all__ = ["patch_configurator", "patch_platform_allocator", "patch_platform_pools"]


def patch_platform_pools(memory_pool: ModuleType) -> None:
    """Answer ``current_platform.get_kv_pool_cls`` with the elastic MHA / MLA pools.

    Other kinds (DSA) keep SGLang's answer: the configurator asks for every kind while
    building any pool, and a DSA pool actually built is refused by
    :func:`~kvcached.integrations.sglang.patches.check_pool_choice`.
    """
    from sglang.srt.platforms import current_platform

    from kvcached.integrations.sglang.pools import ElasticMHATokenToKVPool, ElasticMLATokenToKVPool

    if not patches.mark_once(current_platform.get_kv_pool_cls):
        return
    original = current_platform.get_kv_pool_cls
    elastic = {"mha": ElasticMHATokenToKVPool, "mla": ElasticMLATokenToKVPool}

    @functools.wraps(original)
    def get_kv_pool_cls(*, kind: str) -> type | None:
        own = original(kind=kind)
        if kind not in elastic:
            return own
        if own is not None:
            raise NotImplementedError(
                f"kvcached: the {type(current_platform).__name__} platform's {kind!r} KV pool "
                f"({getattr(own, '__name__', own)}) has no kvcached version; unset ENABLE_KVCACHED"
            )
        return elastic[kind]

    setattr(get_kv_pool_cls, patches.DONE_MARK, True)
    current_platform.get_kv_pool_cls = get_kv_pool_cls


def patch_platform_allocator(paged: ModuleType) -> None:
    """Answer ``current_platform.get_paged_allocator_cls`` with the elastic paged allocator."""
    from sglang.srt.platforms import current_platform

    if not patches.mark_once(current_platform.get_paged_allocator_cls):
        return
    own = current_platform.get_paged_allocator_cls()
    if own is not None:
        raise NotImplementedError(
            f"kvcached: the {type(current_platform).__name__} platform's paged allocator "
            f"{own.__name__} has no kvcached version; unset ENABLE_KVCACHED"
        )

    def get_paged_allocator_cls() -> type:
        # Imported when first asked: this patch runs while memory_pool may still be importing.
        from kvcached.integrations.sglang.allocators import ElasticPagedTokenToKVPoolAllocator

        return ElasticPagedTokenToKVPoolAllocator

    setattr(get_paged_allocator_cls, patches.DONE_MARK, True)
    current_platform.get_paged_allocator_cls = get_paged_allocator_cls


def patch_configurator(configurator: ModuleType) -> None:
    """The page-size-1 allocator (built by name, no seam), then the shared
    :func:`~kvcached.integrations.sglang.patches.patch_configurator`."""
    from kvcached.integrations.sglang.allocators import ElasticTokenToKVPoolAllocator

    if not patches.mark_once(configurator):
        return
    configurator.TokenToKVPoolAllocator = ElasticTokenToKVPoolAllocator  # type: ignore[attr-defined]
    patches.patch_configurator(configurator.KVCacheConfigurator)
