"""Checks of a :class:`~kvcached.pool.allocator.BlockAllocator`: bad ids passed in by
a caller (a ValueError naming each), and its invariants, rebuilt from scratch (slow:
meant for tests, which call it after every step)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from kvcached.pool.base import PoolIntegrityError

if TYPE_CHECKING:
    from kvcached.pool.allocator import BlockAllocator

__all__ = ["check_allocator", "explain_bad_ids", "repeated_ids"]


def repeated_ids(block_ids: Iterable[int]) -> list[int]:
    """The ids that occur more than once, sorted."""
    seen: set[int] = set()
    repeated: set[int] = set()
    for block in block_ids:
        if block in seen:
            repeated.add(block)
        seen.add(block)
    return sorted(repeated)


def explain_bad_ids(a: BlockAllocator, block_ids: Sequence[object], verb: str, *, allow_cached: bool) -> None:
    """Raise ValueError naming every id of ``block_ids`` that is not in use (or, with
    ``allow_cached``, cached); return if there is none."""
    unknown, pinned, free, cached, repeated = [], [], [], [], []
    seen: set[int] = set()
    for b in block_ids:
        if not isinstance(b, int) or isinstance(b, bool) or not 0 <= b < a.num_blocks:
            unknown.append(b)
            continue
        if b in seen:
            repeated.append(b)
        seen.add(b)
        if b < a.num_pinned_blocks:
            pinned.append(b)
        elif b in a._cached:
            if not allow_cached:
                cached.append(b)
        elif not a.is_used(b):
            free.append(b)
    problems = [
        f"{what} {ids[:16]}{'...' if len(ids) > 16 else ''}"
        for what, ids in (
            (f"unknown ids (valid: 0..{a.num_blocks - 1})", unknown),
            ("pinned null blocks", pinned),
            ("blocks not in use (double free?)", free),
            ("cached blocks, not in use", cached),
            ("repeated ids", repeated),
        )
        if ids
    ]
    if problems:
        raise ValueError(f"{verb}(): " + "; ".join(problems))


def _require(ok: bool, what: str) -> None:
    if not ok:
        raise PoolIntegrityError(what)


def check_allocator(a: BlockAllocator) -> None:
    """Raise :class:`PoolIntegrityError` naming the first broken invariant of ``a``."""
    from kvcached.pool.pages import MAPPED, MAPPING, UNMAPPED, UNMAPPING

    bpp = a.blocks_per_page
    states = a._page_state
    pages_in = {s: {p for p in range(a.num_pages) if states[p] == s} for s in (UNMAPPED, MAPPING, MAPPED, UNMAPPING)}
    _require(sorted(a._unmapped) == sorted(pages_in[UNMAPPED]), "the unmapped heap is not the unmapped pages")
    _require(
        [len(pages_in[s]) for s in (MAPPING, MAPPED, UNMAPPING)]
        == [a.num_mapping_pages, a.num_mapped_pages, a.num_unmapping_pages],
        "page counts",
    )
    from kvcached.pool.pages import NO_BLOCKS as _NO_BLOCKS

    _require(not _NO_BLOCKS, "the shared empty used set was changed")
    used: set[int] = set()
    for page, page_used in enumerate(a._page_used):
        _require(page_used <= set(range(page * bpp, (page + 1) * bpp)), f"page {page}: used blocks of other pages")
        _require(states[page] != UNMAPPED or page_used is _NO_BLOCKS, f"unmapped page {page} has its own used set")
        used |= page_used
    cached = set(a._cached)
    _require(used.isdisjoint(cached), "a block both used and cached")
    _require(all(isinstance(b, int) and a.num_pinned_blocks <= b < a.num_blocks for b in used | cached), "bad live id")
    cached_per_page = [0] * a.num_pages
    for b in cached:
        cached_per_page[b // bpp] += 1
    _require(cached_per_page == a._page_num_cached, "per-page cached counts")

    mask = sum(1 << c for c, bucket in enumerate(a._buckets) if bucket)
    _require(mask == a._bucket_mask, "bucket mask")
    _require(not a._buckets[0] and not a._buckets[bpp], "a page filed as full or empty in the buckets")
    _require(a._lowest == ((mask & -mask).bit_length() - 1 if mask else bpp), "stale lowest bucket")
    filed = [p for bucket in a._buckets for p in bucket]
    _require(len(filed) == len(set(filed)), "a page in several buckets")
    cur = a._cur_page
    if cur >= 0:
        _require(states[cur] == MAPPED, "the current page is not mapped")
        _require(a._cur_list is a._free_lists[cur], "the current free list is not the current page's")
        _require(a._cur_used is a._page_used[cur], "the current used set is not the current page's")
        _require(cur not in filed and cur not in a._empty, "the current page is also filed")
    else:
        _require(not a._cur_list and a._cur_used is _NO_BLOCKS, "no current page, but a current free list")

    num_free = num_empty = 0
    for page in range(a.num_pages):
        free_list = a._free_lists[page]
        blocks = set(range(page * bpp, (page + 1) * bpp))
        live = blocks & (used | cached)
        if states[page] != MAPPED:
            _require(not free_list and not live, f"page {page} (state {states[page]}) holds blocks")
            _require(page not in a._empty and page not in filed, f"page {page} is not mapped but filed")
            continue
        free = set(free_list)
        _require(free <= blocks and len(free) == len(free_list), f"page {page}: bad free list")
        pinned = a.num_pinned_on(page)
        _require(len(free) + len(live) + pinned == bpp and not free & live, f"page {page} loses or shares blocks")
        _require(not free & set(range(a.num_pinned_blocks)), f"page {page}: a pinned block is free")
        count = len(free_list)
        num_free += count
        num_empty += count == bpp
        if page != cur:
            _require((page in a._empty) == (count == bpp), f"page {page}: empty but not in the reserve, or not")
            _require((page in a._buckets[count]) == (0 < count < bpp), f"page {page} is in the wrong bucket")
    _require(num_free == a.num_free, f"num_free {a.num_free}, counted {num_free}")
    _require(num_empty == a.num_empty_pages, f"num_empty_pages {a.num_empty_pages}, counted {num_empty}")
    _require(a.num_used == len(used), f"num_used {a.num_used}, counted {len(used)}")
