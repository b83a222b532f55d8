"""The page table of a pool: page states, free blocks per page, and which page serves next.

A page is ``UNMAPPED``, ``MAPPING`` (claimed, being mapped), ``MAPPED`` or ``UNMAPPING``
(claimed, being unmapped); only an *empty* page — mapped, every block free; together
the reserve — can be claimed for unmapping. The first ``num_pinned_blocks`` blocks (the
engines' null/padding block) are never free, so their page never empties.

Allocation fills the fullest mapped page first. Partly free pages sit in buckets by
their count of free blocks, with a bit mask of the non-empty buckets, so the fullest is
found in O(1); empty pages come last. One page at a time is *current*: out of the
buckets while it serves allocations, so taking from it, or returning blocks to it,
touches no bucket. Pure bookkeeping; :class:`~kvcached.pool.allocator.BlockAllocator`
builds the block states on it.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
from collections.abc import Iterable, Sequence

from kvcached.pool import checks
from kvcached.pool.base import PoolIntegrityError

__all__ = ["MAPPED", "MAPPING", "NO_BLOCKS", "UNMAPPED", "UNMAPPING", "PageTable"]

UNMAPPED, MAPPING, MAPPED, UNMAPPING = 0, 1, 2, 3

NO_BLOCKS: set[int] = set()  # the used set of pages that are not mapped; never changed

Runs = tuple[list[int], list[tuple[int, int, int]]]  # sorted ids, (page, start, end) spans


class PageTable:
    """Page states and free lists; the caller serializes access.

    Plain attributes, read directly: ``num_free`` (free blocks on mapped pages),
    ``num_empty_pages``, ``num_mapped_pages``, ``num_mapping_pages``,
    ``num_unmapping_pages``, ``num_reserve_draws`` (empty pages that started to serve).
    """

    __slots__ = (
        "_bucket_mask", "_buckets", "_cur_list", "_cur_page", "_cur_used", "_empty", "_free_lists", "_lowest",
        "_page_state", "_page_used", "_unmapped", "blocks_per_page", "num_blocks", "num_empty_pages", "num_free",
        "num_mapped_pages", "num_mapping_pages", "num_pages", "num_pinned_blocks", "num_reserve_draws",
        "num_unmapping_pages",
    )  # fmt: skip

    def __init__(self, num_pages: int, blocks_per_page: int, num_pinned_blocks: int = 1) -> None:
        for name, value in (("num_pages", num_pages), ("blocks_per_page", blocks_per_page)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(num_pinned_blocks, int) or not 0 <= num_pinned_blocks <= blocks_per_page:
            raise ValueError(f"num_pinned_blocks must be in [0, {blocks_per_page}], got {num_pinned_blocks!r}")
        self.num_pages = num_pages
        self.blocks_per_page = blocks_per_page
        self.num_blocks = num_pages * blocks_per_page
        self.num_pinned_blocks = num_pinned_blocks
        self.num_free = self.num_empty_pages = self.num_mapped_pages = self.num_reserve_draws = 0
        self.num_mapping_pages = self.num_unmapping_pages = 0
        self._page_state = bytearray(num_pages)
        self._free_lists: list[list[int]] = [[] for _ in range(num_pages)]
        self._page_used: list[set[int]] = [NO_BLOCKS] * num_pages  # used blocks, per mapped page
        self._buckets: list[dict[int, None]] = [{} for _ in range(blocks_per_page + 1)]  # by free count
        self._bucket_mask = 0  # bit c set <=> _buckets[c] non-empty
        self._lowest = blocks_per_page  # fewest free blocks of a bucketed page (blocks_per_page: none)
        self._cur_page = -1
        self._cur_list: list[int] = []  # is _free_lists[_cur_page]
        self._cur_used = NO_BLOCKS  # is _page_used[_cur_page]
        self._empty: dict[int, None] = {}  # empty pages but the current one, least recently emptied first
        self._unmapped = list(range(num_pages))  # a min-heap: map low page ids first

    @property
    def num_unmapped_pages(self) -> int:
        return len(self._unmapped)

    @property
    def num_held_pages(self) -> int:
        """Pages that hold or may hold physical memory (mapped or in flight)."""
        return self.num_mapped_pages + self.num_mapping_pages + self.num_unmapping_pages

    def page_state(self, page: int) -> int:
        return self._page_state[page]

    def num_pinned_on(self, page: int) -> int:
        return max(0, min(self.num_pinned_blocks - page * self.blocks_per_page, self.blocks_per_page))

    def num_used_on(self, page: int) -> int:
        """Used blocks on ``page``."""
        return len(self._page_used[page])

    # -- free blocks ---------------------------------------------------------------

    def _runs(self, block_ids: Sequence[int]) -> Runs:
        """``block_ids`` sorted, and the ``(page, start, end)`` spans of its runs of one page."""
        bpp = self.blocks_per_page
        ordered = sorted(block_ids)
        spans = []
        start, n = 0, len(ordered)
        while start < n:
            page = ordered[start] // bpp
            end = bisect.bisect_left(ordered, (page + 1) * bpp, start)
            spans.append((page, start, end))
            start = end
        return ordered, spans

    def _give_back(self, ordered: list[int], spans: list[tuple[int, int, int]]) -> None:
        """Put the runs of ``ordered`` (no longer used or cached) on their pages' free lists."""
        free_lists = self._free_lists
        for page, start, end in spans:
            free_list = free_lists[page]
            count = len(free_list)
            free_list += ordered[start:end]
            self._refile(page, count, count + end - start)
        self.num_free += len(ordered)
        self._refresh_lowest()

    def _refile(self, page: int, old: int, new: int) -> None:
        """File ``page``, whose free count went from ``old`` to ``new``, where it now belongs."""
        bpp = self.blocks_per_page
        if page == self._cur_page:
            self.num_empty_pages += (new == bpp) - (old == bpp)
            return
        buckets = self._buckets
        if old == bpp:
            del self._empty[page]
            self.num_empty_pages -= 1
        elif old:
            bucket = buckets[old]
            del bucket[page]
            if not bucket:
                self._bucket_mask ^= 1 << old
        if new == bpp:
            self._empty[page] = None
            self.num_empty_pages += 1
        elif new:
            bucket = buckets[new]
            if not bucket:
                self._bucket_mask |= 1 << new
            bucket[page] = None

    def _park_current(self) -> None:
        """Put the current page back among the others (it stops being current)."""
        page = self._cur_page
        if page >= 0:
            self._cur_page, self._cur_list, self._cur_used = -1, [], NO_BLOCKS
            count = len(self._free_lists[page])
            self.num_empty_pages -= count == self.blocks_per_page
            self._refile(page, 0, count)

    def _refresh_lowest(self) -> None:
        mask = self._bucket_mask
        self._lowest = (mask & -mask).bit_length() - 1 if mask else self.blocks_per_page

    # -- the mapping life cycle -----------------------------------------------------

    def claim_unmapped(self, num_pages: int) -> list[int]:
        """Take up to ``num_pages`` unmapped pages, lowest ids first: UNMAPPED → MAPPING."""
        pages = [heapq.heappop(self._unmapped) for _ in range(min(max(num_pages, 0), len(self._unmapped)))]
        for page in pages:
            self._page_state[page] = MAPPING
        self.num_mapping_pages += len(pages)
        return pages

    def publish(self, pages: Iterable[int]) -> None:
        """The pages are mapped now: MAPPING → MAPPED, their blocks free (but pinned ones)."""
        bpp = self.blocks_per_page
        for page in self._expect(pages, MAPPING, "publish"):
            self._page_state[page] = MAPPED
            self._page_used[page] = set()
            start = page * bpp + self.num_pinned_on(page)
            self._free_lists[page] = list(range(page * bpp + bpp - 1, start - 1, -1))
            self.num_mapping_pages -= 1
            self.num_mapped_pages += 1
            self.num_free += len(self._free_lists[page])
            self._refile(page, 0, len(self._free_lists[page]))
        self._refresh_lowest()

    def abandon(self, pages: Iterable[int]) -> None:
        """Mapping failed: MAPPING → UNMAPPED."""
        for page in self._expect(pages, MAPPING, "abandon"):
            self._page_state[page] = UNMAPPED
            self.num_mapping_pages -= 1
            heapq.heappush(self._unmapped, page)

    def claim_empty(self, num_pages: int) -> list[int]:
        """Take up to ``num_pages`` empty pages out of use to unmap them, least recently
        emptied first (the current page last): MAPPED → UNMAPPING."""
        if num_pages > len(self._empty) and len(self._cur_list) == self.blocks_per_page:
            self._park_current()
        pages = list(itertools.islice(self._empty, max(num_pages, 0)))
        for page in pages:
            del self._empty[page]
            self._page_state[page] = UNMAPPING
            self._free_lists[page] = []
        self.num_empty_pages -= len(pages)
        self.num_mapped_pages -= len(pages)
        self.num_unmapping_pages += len(pages)
        self.num_free -= len(pages) * self.blocks_per_page
        return pages

    def retire(self, pages: Iterable[int]) -> None:
        """The pages are unmapped now: UNMAPPING → UNMAPPED."""
        for page in self._expect(pages, UNMAPPING, "retire"):
            self._page_state[page] = UNMAPPED
            self._page_used[page] = NO_BLOCKS
            self.num_unmapping_pages -= 1
            heapq.heappush(self._unmapped, page)

    def restore(self, pages: Iterable[int]) -> None:
        """Unmapping failed, the pages are still mapped: UNMAPPING → MAPPED (empty)."""
        bpp = self.blocks_per_page
        for page in self._expect(pages, UNMAPPING, "restore"):
            self._page_state[page] = MAPPED
            self._free_lists[page] = list(range(page * bpp + bpp - 1, page * bpp - 1, -1))
            self.num_unmapping_pages -= 1
            self.num_mapped_pages += 1
            self.num_free += bpp
            self._refile(page, 0, bpp)

    def _expect(self, pages: Iterable[int], state: int, verb: str) -> list[int]:
        pages = list(pages)
        wrong = [p for p in pages if not 0 <= p < self.num_pages or self._page_state[p] != state]
        if wrong or len(set(pages)) != len(pages):
            raise PoolIntegrityError(f"{verb}(): pages {wrong or checks.repeated_ids(pages)} are not in state {state}")
        return pages
