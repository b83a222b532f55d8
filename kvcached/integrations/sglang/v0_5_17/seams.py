"""SGLang 0.5.17's seams. It has no ``current_platform.get_kv_pool_cls`` (its
``get_{mha,mla}_kv_pool_cls`` and ``get_paged_allocator_cls`` are asked only on
out-of-tree platforms): the configurator builds every in-tree KV pool and allocator from
the class names it imported, so those names are replaced in its module."""

from __future__ import annotations

from types import ModuleType

from kvcached.integrations.sglang import patches

__all__ = ["patch_configurator"]


def patch_configurator(configurator: ModuleType) -> None:
    """The MHA / MLA pools and both allocators by name, then the shared
    :func:`~kvcached.integrations.sglang.patches.patch_configurator`. Pools SGLang builds
    under other names (FP4, MXFP8, page-major, DSA, SWA, ...) stay SGLang's and are refused
    by :func:`~kvcached.integrations.sglang.patches.check_pool_choice`."""
    from kvcached.integrations.sglang.allocators import (
        ElasticPagedTokenToKVPoolAllocator,
        ElasticTokenToKVPoolAllocator,
    )
    from kvcached.integrations.sglang.pools import ElasticMHATokenToKVPool, ElasticMLATokenToKVPool

    if not patches.mark_once(configurator):
        return
    module: dict[str, type] = {
        "MHATokenToKVPool": ElasticMHATokenToKVPool,
        "MLATokenToKVPool": ElasticMLATokenToKVPool,
        "TokenToKVPoolAllocator": ElasticTokenToKVPoolAllocator,
        "PagedTokenToKVPoolAllocator": ElasticPagedTokenToKVPoolAllocator,
    }
    for name, cls in module.items():
        if not hasattr(configurator, name):
            raise RuntimeError(f"kvcached: SGLang's kv_cache_configurator has no {name}; this is not SGLang 0.5.17")
        setattr(configurator, name, cls)
    patches.patch_configurator(configurator.KVCacheConfigurator)
