"""Block states of a pool: used, cached (kept for prefix hits) or free, page-aware.

Pure bookkeeping (no torch, no driver, no lock): :class:`~kvcached.pool.keeper.PageKeeper`
holds the lock and does the mapping this records. Built on
:class:`~kvcached.pool.pages.PageTable` (pages, free lists, fullest-first order).

A block is *pinned* (never handed out), *used* (handed out), *cached* (returned but
kept with its contents for prefix hits, evictable), *free* (on a mapped page), or on an
unmapped page. The usual calls — :meth:`BlockAllocator.take` from the current page
while it is the fullest, :meth:`BlockAllocator.free` of used blocks of the current page
— do their per-block work in C (list slices, set operations): they are the engine's hot
path. What to evict: :mod:`kvcached.pool.eviction`; invariants and bad-id reports:
:mod:`kvcached.pool.checks`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from kvcached.pool import checks, eviction
from kvcached.pool.base import PoolIntegrityError
from kvcached.pool.pages import MAPPED, PageTable, Runs

__all__ = ["BlockAllocator"]


class BlockAllocator(PageTable):
    """Block states of one pool; the caller serializes access.

    Besides the page table's: counters ``num_allocs``, ``num_frees``, ``num_evicted``.
    """

    __slots__ = ("_cached", "_page_cache_tick", "_page_num_cached", "_tick", "num_allocs", "num_evicted", "num_frees")

    def __init__(self, num_pages: int, blocks_per_page: int, num_pinned_blocks: int = 1) -> None:
        super().__init__(num_pages, blocks_per_page, num_pinned_blocks)
        self.num_allocs = self.num_frees = self.num_evicted = 0
        self._cached: dict[int, None] = {}  # least recently cached first
        self._page_num_cached = [0] * num_pages
        self._page_cache_tick = [0] * num_pages
        self._tick = 0

    @property
    def num_used(self) -> int:
        # Every block of a mapped page is free, cached, used or pinned.
        pinned_pages = range(-(-self.num_pinned_blocks // self.blocks_per_page))
        pinned = sum(self.num_pinned_on(p) for p in pinned_pages if self._page_state[p] == MAPPED)
        return self.num_mapped_pages * self.blocks_per_page - self.num_free - len(self._cached) - pinned

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    def is_used(self, block: int) -> bool:
        ok = isinstance(block, int) and 0 <= block < self.num_blocks
        return ok and block in self._page_used[block // self.blocks_per_page]

    def cached_blocks(self) -> list[int]:
        """Cached block ids, least recently cached first."""
        return list(self._cached)

    # -- the hot path ------------------------------------------------------------

    def take(self, n: int) -> list[int]:
        """Hand out ``n`` free blocks, fullest mapped page first.

        Precondition: ``0 < n <= num_free`` (the caller checks; nothing is validated here).
        """
        cur = self._cur_list
        count = len(cur)
        if n <= count <= self._lowest:  # the current page is the fullest and has enough
            if count == self.blocks_per_page:
                self.num_empty_pages -= 1
                self.num_reserve_draws += 1
            out = cur[-n:]
            del cur[-n:]
            self.num_free -= n
            self.num_allocs += 1
            self._cur_used.update(out)
            return out
        return self._take_pages(n)

    def _take_pages(self, n: int) -> list[int]:
        self._park_current()
        self.num_free -= n
        self.num_allocs += 1
        buckets, free_lists, page_used, bpp = self._buckets, self._free_lists, self._page_used, self.blocks_per_page
        out: list[int] = []
        while n:
            mask = self._bucket_mask
            if mask:
                count = (mask & -mask).bit_length() - 1
                bucket = buckets[count]
                page = bucket.popitem()[0]
                if not bucket:
                    self._bucket_mask = mask ^ (1 << count)
            else:
                page = self._empty.popitem()[0]
                self.num_empty_pages -= 1
                self.num_reserve_draws += 1
                count = bpp
            free_list = free_lists[page]
            if n < count:
                got = free_list[-n:]
                del free_list[-n:]
                self._cur_page, self._cur_list, self._cur_used = page, free_list, page_used[page]  # serves next calls
                n = 0
            else:
                got = free_list
                free_lists[page] = []
                n -= count
            page_used[page].update(got)
            out += got
        self._refresh_lowest()
        return out

    def free(self, block_ids: Sequence[int]) -> None:
        """Return used or cached blocks to their pages.

        Raises:
            ValueError: an id is unknown, pinned, already free, or repeated; nothing changed.
        """
        used = self._cur_used
        if used.issuperset(block_ids):  # the usual case: used blocks of the current page
            n = len(used)
            used.difference_update(block_ids)
            n -= len(used)
            if n != len(block_ids):
                used.update(block_ids)
                raise ValueError(f"free(): repeated ids {checks.repeated_ids(block_ids)}")
            self.num_frees += 1
            cur = self._cur_list
            cur += block_ids
            self.num_free += n
            if len(cur) == self.blocks_per_page:
                self.num_empty_pages += 1
        else:
            self._free_runs(block_ids)

    def _free_runs(self, block_ids: Sequence[int]) -> None:
        # Sorted, the blocks of one page are a run: checks and moves stay in C.
        try:
            runs = self._used_runs(block_ids)
        except TypeError:  # ids that do not even sort
            runs = None
        if runs is None:
            return self._free_mixed(block_ids)
        ordered, spans = runs
        page_used = self._page_used
        for i, (page, start, end) in enumerate(spans):
            used = page_used[page]
            n = len(used)
            used.difference_update(ordered[start:end])
            if n - len(used) != end - start:
                for page2, start2, end2 in spans[: i + 1]:
                    page_used[page2].update(ordered[start2:end2])
                raise ValueError(f"free(): repeated ids {checks.repeated_ids(block_ids)}")
        self.num_frees += 1
        self._give_back(ordered, spans)

    def _used_runs(self, block_ids: Sequence[int]) -> Runs | None:
        """:meth:`_runs` of ``block_ids``, or None if some id is not a used block."""
        ordered, spans = self._runs(block_ids)
        if ordered and not (ordered[0] >= 0 and ordered[-1] < self.num_blocks):
            return None
        page_used = self._page_used
        for page, start, end in spans:
            if not page_used[page].issuperset(ordered[start:end]):
                return None
        return ordered, spans

    def _free_mixed(self, block_ids: Sequence[int]) -> None:
        checks.explain_bad_ids(self, block_ids, "free", allow_cached=True)
        bpp, cached, page_used = self.blocks_per_page, self._cached, self._page_used
        self._uncache([b for b in block_ids if b in cached])
        for block in block_ids:
            page_used[block // bpp].discard(block)
        self.num_frees += 1
        self._give_back(*self._runs(block_ids))

    # -- cached (prefix) blocks --------------------------------------------------

    def cache(self, block_ids: Sequence[int]) -> None:
        """Turn used blocks into cached ones (the most recently cached last).

        Raises:
            ValueError: an id is not in use, or repeated; nothing changed.
        """
        try:
            runs = self._used_runs(block_ids)
        except TypeError:
            runs = None
        if runs is None:
            checks.explain_bad_ids(self, block_ids, "cache", allow_cached=False)
            raise PoolIntegrityError("cache(): ids not in use passed the check")
        ordered, spans = runs
        if len(set(ordered)) != len(ordered):
            raise ValueError(f"cache(): repeated ids {checks.repeated_ids(block_ids)}")
        self._tick += 1
        counts, ticks, page_used = self._page_num_cached, self._page_cache_tick, self._page_used
        for page, start, end in spans:
            page_used[page].difference_update(ordered[start:end])
            counts[page] += end - start
            ticks[page] = self._tick
        self._cached.update(dict.fromkeys(block_ids))

    def reuse(self, block_ids: Sequence[int]) -> bool:
        """Turn cached blocks back into used ones (a prefix hit).

        Returns:
            True if every id was cached and now is used; False — nothing changed — if
            some id is no longer cached (evicted, maybe handed out again).

        Raises:
            ValueError: an id is out of range or repeated; nothing changed.
        """
        if len(set(block_ids)) != len(block_ids):
            raise ValueError(f"reuse(): repeated ids {checks.repeated_ids(block_ids)}")
        cached = self._cached
        if not all(b in cached for b in block_ids):
            unknown = [b for b in block_ids if not (isinstance(b, int) and 0 <= b < self.num_blocks)]
            if unknown:
                raise ValueError(f"reuse(): unknown ids (valid: 0..{self.num_blocks - 1}) {unknown[:16]}")
            return False
        self._uncache(block_ids)
        bpp, page_used = self.blocks_per_page, self._page_used
        for block in block_ids:
            page_used[block // bpp].add(block)
        return True

    def _uncache(self, block_ids: Iterable[int]) -> None:
        cached, counts, bpp = self._cached, self._page_num_cached, self.blocks_per_page
        for block in block_ids:
            del cached[block]
            counts[block // bpp] -= 1

    def evict(self, num_blocks: int) -> list[int]:
        """Free up to ``num_blocks`` cached blocks chosen by
        :func:`~kvcached.pool.eviction.pick_blocks` (page-aware LRU); return their ids."""
        victims = eviction.pick_blocks(self, num_blocks)
        self._evict_exactly(victims)
        return victims

    def evict_pages(self, num_pages: int) -> list[int]:
        """Evict all cached blocks of up to ``num_pages`` pages that hold no used block
        (they become empty), least recently cached first; return the evicted ids."""
        victims = eviction.pick_pages(self, num_pages)
        self._evict_exactly(victims)
        return victims

    def _evict_exactly(self, victims: list[int]) -> None:
        if victims:
            self._uncache(victims)
            self._give_back(*self._runs(victims))
            self.num_evicted += len(victims)

    def check_integrity(self) -> None:
        """Verify every invariant; raise :class:`PoolIntegrityError` naming the first broken one."""
        checks.check_allocator(self)
