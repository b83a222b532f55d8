"""The patches for SGLang 0.5.17, one per SGLang module, applied when it is imported.

====================================================  =============================================
``sglang.srt.mem_cache.kv_cache_configurator``         the MHA / MLA pools and both allocators by
                                                       name (0.5.17 has no pool seam for in-tree
                                                       platforms); capacity from free device memory;
                                                       unsupported pools refused
``...scheduler_components.invariant_checker``          the leak check counts held slots, not mapped
``...scheduler_components.weight_updater``             release / resume of ``kv_cache`` unmaps all /
                                                       maps the pinned group again
``sglang.srt.mem_cache.radix_cache``                   cached prefix bounded by ``KVCACHED_PREFIX_CACHE_MAX``
====================================================  =============================================
"""

from __future__ import annotations

from kvcached.integrations.hooks import when_imported
from kvcached.integrations.sglang import patches
from kvcached.integrations.sglang.v0_5_17 import seams

__all__ = ["install"]


def install() -> None:
    """Arm every patch of this version range (each applies when its module is imported)."""
    when_imported("sglang.srt.mem_cache.kv_cache_configurator", seams.patch_configurator)
    patches.arm_shared()
