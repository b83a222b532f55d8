"""Which cached blocks to evict: page-aware, least recently cached first.

Evicting a cached block only frees memory when its page then holds nothing live, so
the blocks of *cache-only* pages (no used block) go first, the page whose blocks were
cached longest ago first; then the remaining cached blocks, least recently cached
first. Pure choice over the allocator's state; the allocator applies it.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvcached.pool.allocator import BlockAllocator

__all__ = ["cache_only_pages", "pick_blocks", "pick_pages"]


def cache_only_pages(a: BlockAllocator) -> list[int]:
    """Mapped pages holding cached blocks and no used one, least recently cached first."""
    bpp = a.blocks_per_page
    pages = {b // bpp for b in a._cached}
    only = [p for p in pages if a.num_used_on(p) == 0]
    only.sort(key=a._page_cache_tick.__getitem__)
    return only


def _cached_on(a: BlockAllocator, page: int) -> list[int]:
    start = page * a.blocks_per_page
    return [b for b in range(start, start + a.blocks_per_page) if b in a._cached]


def pick_blocks(a: BlockAllocator, num_blocks: int) -> list[int]:
    """Up to ``num_blocks`` cached blocks to evict, in eviction order."""
    victims: list[int] = []
    for page in cache_only_pages(a):
        need = num_blocks - len(victims)
        if need <= 0:
            break
        if a._page_num_cached[page] <= need:
            victims += _cached_on(a, page)
        else:  # part of the page: its least recently cached blocks
            victims += [b for b in a._cached if b // a.blocks_per_page == page][:need]
    need = num_blocks - len(victims)
    if need > 0:
        chosen = set(victims)
        victims += itertools.islice((b for b in a._cached if b not in chosen), need)
    return victims


def pick_pages(a: BlockAllocator, num_pages: int) -> list[int]:
    """Every cached block of up to ``num_pages`` cache-only pages."""
    victims: list[int] = []
    for page in cache_only_pages(a)[: max(num_pages, 0)]:
        victims += _cached_on(a, page)
    return victims
