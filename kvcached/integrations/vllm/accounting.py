"""What a vLLM engine's pages report: the control plane's figures and a full recount.

Functions of a :class:`~kvcached.integrations.vllm.pages.VllmPages`; ``stats`` is what the
engine's watcher publishes, ``check_integrity`` what tests assert after every change.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvcached.integrations.vllm.states import CACHED, FREE, MAPPED, MAPPING, UNMAPPING
from kvcached.pool.base import PoolStats

if TYPE_CHECKING:
    from kvcached.integrations.vllm.pages import VllmPages

__all__ = ["check_integrity", "stats"]


def stats(pages: VllmPages) -> PoolStats:
    """The pool's figures for the control plane (bytes and counters), read under its lock."""
    with pages.lock:
        bb, gb = pages.block_bytes, pages.group_bytes
        num_free_mapped = pages.num_blocks_on_mapped_pages() - pages.num_cached
        reserve = len(pages.mapped_empty_pages())
        return PoolStats(
            used_bytes=(pages._num_used - 1) * bb, cached_bytes=pages.num_cached * bb,
            free_bytes=num_free_mapped * bb, reserve_bytes=reserve * gb,
            mapped_bytes=pages._num_mapped * gb, virtual_bytes=pages.num_pages * gb,
            limit_bytes=pages._limit_bytes, limit_met=pages.limit_met, demand_bytes=pages._demand_bytes,
            block_bytes=bb, group_bytes=gb, num_blocks_total=pages.num_blocks,
            num_blocks_used=pages._num_used - 1, num_blocks_cached=pages.num_cached,
            num_blocks_free=num_free_mapped, num_blocks_pinned=1, num_pages_mapped=pages._num_mapped,
            num_allocs=0, num_frees=0, num_denied=pages._num_denied, num_sync_maps=pages._num_sync_maps,
            num_evicted=pages._num_evicted, num_pages_mapped_total=pages._num_mapped_total,
            num_pages_unmapped_total=pages._num_unmapped_total,
        )

def check_integrity(pages: VllmPages) -> None:
    """Recount everything from the per-block states; raise AssertionError on a mismatch."""
    with pages.lock:
        bpp = pages.blocks_per_page
        held, cached = [0] * pages.num_pages, [0] * pages.num_pages
        for b, s in enumerate(pages.block_state):
            if s != FREE:
                held[b // bpp] += 1
                cached[b // bpp] += s == CACHED
                assert pages._suspended or pages.page_state[b // bpp] == MAPPED, f"block {b} is {s} on an unmapped page"
        assert held == pages.held and cached == pages.cached_on
        assert pages._num_mapped == sum(1 for s in pages.page_state if s in (MAPPED, UNMAPPING))
        # Prefetch and trim call the driver outside the lock: pages being mapped or unmapped
        # may or may not be in the arena right now.
        mapping = sum(1 for s in pages.page_state if s == MAPPING)
        unmapping = sum(1 for s in pages.page_state if s == UNMAPPING)
        mapped = pages.mapper.mapped_bytes
        assert (pages._num_mapped - unmapping) * pages.group_bytes <= mapped <= (pages._num_mapped + mapping) * pages.group_bytes
