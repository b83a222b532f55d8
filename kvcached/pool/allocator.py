"""Page-aware block bookkeeping: which blocks are used, cached or free, on which pages.

Pure bookkeeping (no torch, no driver, no lock): :class:`~kvcached.pool.pagepool.PagePool`
holds the lock and does the mapping this class only records.

A block is in exactly one state:

* *pinned* — the first ``num_pinned_blocks`` blocks (the engines' null/padding block):
  never handed out, so page 0 never empties and stays mapped;
* *used* — handed out by :meth:`take`, not yet returned;
* *cached* — returned by the engine but kept with its contents (prefix caching);
  evictable, least recently cached first;
* *free* — on a mapped page, ready for :meth:`take`;
* *unmapped* — its page has no physical memory.

A page is ``UNMAPPED``, ``MAPPING`` (claimed by a mapper, not yet usable), ``MAPPED``
or ``UNMAPPING`` (taken out of use, being unmapped). Only a mapped page whose blocks
are all free — an *empty* page, part of the reserve — can be unmapped.

Allocation fills the fullest mapped page first: partially free pages sit in buckets by
their number of free blocks, with a bit mask of the non-empty buckets, so the fullest
page is found in O(1); empty pages are used last. Returned blocks go back to their
page's free list. :meth:`take` and :meth:`free` are O(n) in the blocks passed and, in
the usual case of blocks of one page, do their per-block work in C (list slices, set
operations) — they are the engine's hot path.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterable, Sequence

__all__ = ["BlockAllocator", "PoolIntegrityError", "UNMAPPED", "MAPPING", "MAPPED", "UNMAPPING"]

UNMAPPED, MAPPING, MAPPED, UNMAPPING = 0, 1, 2, 3


class PoolIntegrityError(AssertionError):
    """An internal invariant of the pool does not hold (a bug, never a user error)."""


class BlockAllocator:
    """Block and page states of one pool; the caller serializes access.

    Hot-path attributes are plain attributes, read directly by the pool:
    ``num_free`` (free blocks on mapped pages), ``num_empty_pages`` (mapped pages
    with every block free), ``num_mapped_pages``, ``num_mapping_pages``,
    ``num_unmapping_pages``, and the counters ``num_allocs``, ``num_frees``,
    ``num_reserve_draws`` (empty pages that :meth:`take` started using) and
    ``num_evicted``.
    """

    def __init__(self, num_pages: int, blocks_per_page: int, num_pinned_blocks: int = 1) -> None:
        if not isinstance(num_pages, int) or num_pages <= 0:
            raise ValueError(f"num_pages must be a positive integer, got {num_pages!r}")
        if not isinstance(blocks_per_page, int) or blocks_per_page <= 0:
            raise ValueError(f"blocks_per_page must be a positive integer, got {blocks_per_page!r}")
        if not isinstance(num_pinned_blocks, int) or not 0 <= num_pinned_blocks <= blocks_per_page:
            raise ValueError(f"num_pinned_blocks must be in [0, {blocks_per_page}], got {num_pinned_blocks!r}")
        self.num_pages = num_pages
        self.blocks_per_page = blocks_per_page
        self.num_blocks = num_pages * blocks_per_page
        self.num_pinned_blocks = num_pinned_blocks
        self.num_free = 0
        self.num_empty_pages = 0
        self.num_mapped_pages = 0
        self.num_mapping_pages = 0
        self.num_unmapping_pages = 0
        self.num_allocs = 0
        self.num_frees = 0
        self.num_reserve_draws = 0
        self.num_evicted = 0
        self._page_state = bytearray(num_pages)
        self._free_lists: list[list[int]] = [[] for _ in range(num_pages)]
        # _buckets[c]: mapped pages with c free blocks, 0 < c < blocks_per_page (insertion-ordered set).
        self._buckets: list[dict[int, None]] = [{} for _ in range(blocks_per_page + 1)]
        self._bucket_mask = 0  # bit c set <=> _buckets[c] non-empty
        self._empty: dict[int, None] = {}  # mapped pages with every block free, oldest first
        self._unmapped = list(range(num_pages))  # min-heap: map low page ids first
        self._used: set[int] = set()
        self._cached: dict[int, None] = {}  # least recently cached first
        self._page_num_cached = [0] * num_pages
        self._page_cache_tick = [0] * num_pages  # when a block of the page was last cached
        self._tick = 0

    # -- queries ---------------------------------------------------------------

    @property
    def num_used(self) -> int:
        return len(self._used)

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    @property
    def num_unmapped_pages(self) -> int:
        return len(self._unmapped)

    @property
    def num_held_pages(self) -> int:
        """Pages that hold or may hold physical memory (mapped or in flight)."""
        return self.num_mapped_pages + self.num_mapping_pages + self.num_unmapping_pages

    def page_state(self, page: int) -> int:
        return self._page_state[page]

    def is_used(self, block: int) -> bool:
        return block in self._used

    def is_cached(self, block: int) -> bool:
        return block in self._cached

    def cached_blocks(self) -> list[int]:
        """Cached block ids, least recently cached first."""
        return list(self._cached)

    # -- the hot path ------------------------------------------------------------

    def take(self, n: int) -> list[int]:
        """Hand out ``n`` free blocks, fullest mapped page first.

        Precondition: ``0 < n <= num_free`` (the caller checks; nothing is validated here).
        """
        self.num_free -= n
        self.num_allocs += 1
        buckets = self._buckets
        free_lists = self._free_lists
        out: list[int] | None = None
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
                count = self.blocks_per_page
            if n < count:
                free_list = free_lists[page]
                got = free_list[-n:]
                del free_list[-n:]
                left = count - n
                bucket = buckets[left]
                if not bucket:
                    self._bucket_mask |= 1 << left
                bucket[page] = None
                n = 0
            else:
                got = free_lists[page]
                free_lists[page] = []
                n -= count
            if out is None:
                out = got
            else:
                out += got
        assert out is not None
        self._used.update(out)
        return out

    def free(self, block_ids: Sequence[int]) -> None:
        """Return used or cached blocks to their pages' free lists.

        Raises:
            ValueError: an id is unknown, pinned, already free, or repeated; nothing changed.
        """
        used = self._used
        if used.issuperset(block_ids):
            before = len(used)
            used.difference_update(block_ids)
            if before - len(used) != len(block_ids):
                used.update(block_ids)
                raise ValueError(f"free(): repeated block ids {_repeated(block_ids)}")
            self._give_back(block_ids)
        else:
            self._free_mixed(block_ids)
        self.num_frees += 1

    def _free_mixed(self, block_ids: Sequence[int]) -> None:
        self._validate(block_ids, "free", allow_cached=True)
        cached = [b for b in block_ids if b in self._cached]
        if cached:
            self._uncache(cached)
        self._used.difference_update(block_ids)
        self._give_back(block_ids)

    def _give_back(self, block_ids: Sequence[int]) -> None:
        n = len(block_ids)
        if not n:
            return
        bpp = self.blocks_per_page
        free_lists = self._free_lists
        page = min(block_ids) // bpp
        if max(block_ids) // bpp == page:
            free_list = free_lists[page]
            count = len(free_list)
            free_list.extend(block_ids)
            self._move(page, count, count + n)
        else:
            before: dict[int, int] = {}
            for block in block_ids:
                page = block // bpp
                free_list = free_lists[page]
                if page not in before:
                    before[page] = len(free_list)
                free_list.append(block)
            for page, count in before.items():
                self._move(page, count, len(free_lists[page]))
        self.num_free += n

    def _move(self, page: int, old: int, new: int) -> None:
        """Re-file ``page`` whose free count went from ``old`` to ``new`` (``old < new``)."""
        buckets = self._buckets
        if old:
            bucket = buckets[old]
            del bucket[page]
            if not bucket:
                self._bucket_mask ^= 1 << old
        if new == self.blocks_per_page:
            self._empty[page] = None
            self.num_empty_pages += 1
        else:
            bucket = buckets[new]
            if not bucket:
                self._bucket_mask |= 1 << new
            bucket[page] = None

    # -- cached (prefix) blocks --------------------------------------------------

    def cache(self, block_ids: Sequence[int]) -> None:
        """Turn used blocks into cached ones (most recently cached last).

        Raises:
            ValueError: an id is not used, or repeated; nothing changed.
        """
        used = self._used
        if not used.issuperset(block_ids):
            self._validate(block_ids, "cache", allow_cached=False)
            raise PoolIntegrityError("cache(): ids not in use passed validation")
        before = len(used)
        used.difference_update(block_ids)
        if before - len(used) != len(block_ids):
            used.update(block_ids)
            raise ValueError(f"cache(): repeated block ids {_repeated(block_ids)}")
        self._cached.update(dict.fromkeys(block_ids))
        self._tick += 1
        bpp = self.blocks_per_page
        counts, ticks = self._page_num_cached, self._page_cache_tick
        for block in block_ids:
            page = block // bpp
            counts[page] += 1
            ticks[page] = self._tick

    def reuse(self, block_ids: Sequence[int]) -> bool:
        """Turn cached blocks back into used ones (a prefix-cache hit).

        Returns:
            True if every id was cached and is now used; False if some id is no longer
            cached (evicted, or taken again) — then nothing changed.

        Raises:
            ValueError: an id is out of range or repeated; nothing changed.
        """
        cached = self._cached
        if len(set(block_ids)) != len(block_ids):
            raise ValueError(f"reuse(): repeated block ids {_repeated(block_ids)}")
        if not all(b in cached for b in block_ids):
            bad = [b for b in block_ids if not (isinstance(b, int) and 0 <= b < self.num_blocks)]
            if bad:
                raise ValueError(f"reuse(): unknown block ids {bad[:16]}")
            return False
        self._uncache(block_ids)
        self._used.update(block_ids)
        return True

    def _uncache(self, block_ids: Iterable[int]) -> None:
        cached, counts, bpp = self._cached, self._page_num_cached, self.blocks_per_page
        for block in block_ids:
            del cached[block]
            counts[block // bpp] -= 1

    def evict(self, num_blocks: int) -> list[int]:
        """Free up to ``num_blocks`` cached blocks, page-aware, and return their ids.

        Order: first the cached blocks of pages with no used block (evicting them
        empties the page), least recently cached page first; then the rest, least
        recently cached first.
        """
        victims: list[int] = []
        need = min(num_blocks, len(self._cached))
        if need <= 0:
            return victims
        for page in self._cache_only_pages():
            on_page = self._page_num_cached[page]
            if on_page <= need:
                victims += self._cached_on(page)
            else:
                victims += [b for b in self._cached if b // self.blocks_per_page == page][:need]
            need = num_blocks - len(victims)
            if need <= 0:
                break
        if need > 0:
            chosen = set(victims)
            victims += itertools.islice((b for b in self._cached if b not in chosen), need)
        self._evict_exactly(victims)
        return victims

    def evict_pages(self, num_pages: int) -> list[int]:
        """Evict every cached block of up to ``num_pages`` cache-only pages (which then
        become empty), least recently cached page first; return the evicted ids."""
        victims: list[int] = []
        for page in self._cache_only_pages()[: max(num_pages, 0)]:
            victims += self._cached_on(page)
        self._evict_exactly(victims)
        return victims

    def _cache_only_pages(self) -> list[int]:
        bpp, counts = self.blocks_per_page, self._page_num_cached
        pages = {b // bpp for b in self._cached}
        only = [p for p in pages if len(self._free_lists[p]) + counts[p] + self._num_pinned_on(p) == bpp]
        only.sort(key=self._page_cache_tick.__getitem__)
        return only

    def _cached_on(self, page: int) -> list[int]:
        start = page * self.blocks_per_page
        return [b for b in range(start, start + self.blocks_per_page) if b in self._cached]

    def _evict_exactly(self, victims: list[int]) -> None:
        if victims:
            self._uncache(victims)
            self._give_back(victims)
            self.num_evicted += len(victims)

    # -- pages: mapping bookkeeping ------------------------------------------------

    def claim_unmapped(self, num_pages: int) -> list[int]:
        """Take up to ``num_pages`` unmapped pages (lowest ids first) to map: UNMAPPED → MAPPING."""
        pages = [heapq.heappop(self._unmapped) for _ in range(min(max(num_pages, 0), len(self._unmapped)))]
        for page in pages:
            self._page_state[page] = MAPPING
        self.num_mapping_pages += len(pages)
        return pages

    def publish(self, pages: Iterable[int]) -> None:
        """Pages are now mapped: MAPPING → MAPPED, their blocks free (pinned ones excepted)."""
        bpp = self.blocks_per_page
        for page in self._expect(pages, MAPPING, "publish"):
            self._page_state[page] = MAPPED
            start = page * bpp + self._num_pinned_on(page)
            self._free_lists[page] = list(range(page * bpp + bpp - 1, start - 1, -1))
            self.num_mapping_pages -= 1
            self.num_mapped_pages += 1
            count = len(self._free_lists[page])
            if count:
                self._move(page, 0, count)
                self.num_free += count

    def abandon(self, pages: Iterable[int]) -> None:
        """Mapping failed: MAPPING → UNMAPPED."""
        for page in self._expect(pages, MAPPING, "abandon"):
            self._page_state[page] = UNMAPPED
            self.num_mapping_pages -= 1
            heapq.heappush(self._unmapped, page)

    def claim_empty(self, num_pages: int) -> list[int]:
        """Take up to ``num_pages`` empty pages (least recently emptied first) out of use
        to unmap them: MAPPED → UNMAPPING."""
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
        """Pages are now unmapped: UNMAPPING → UNMAPPED."""
        for page in self._expect(pages, UNMAPPING, "retire"):
            self._page_state[page] = UNMAPPED
            self.num_unmapping_pages -= 1
            heapq.heappush(self._unmapped, page)

    def restore(self, pages: Iterable[int]) -> None:
        """Unmapping failed, the pages are still mapped: UNMAPPING → MAPPED (empty)."""
        bpp = self.blocks_per_page
        for page in self._expect(pages, UNMAPPING, "restore"):
            self._page_state[page] = MAPPED
            self._free_lists[page] = list(range(page * bpp + bpp - 1, page * bpp - 1, -1))
            self._empty[page] = None
            self.num_empty_pages += 1
            self.num_unmapping_pages -= 1
            self.num_mapped_pages += 1
            self.num_free += bpp

    def _expect(self, pages: Iterable[int], state: int, verb: str) -> list[int]:
        pages = list(pages)
        wrong = [p for p in pages if not 0 <= p < self.num_pages or self._page_state[p] != state]
        if wrong or len(set(pages)) != len(pages):
            raise PoolIntegrityError(f"{verb}(): pages {wrong or _repeated(pages)} are not in state {state}")
        return pages

    def _num_pinned_on(self, page: int) -> int:
        return max(0, min(self.num_pinned_blocks - page * self.blocks_per_page, self.blocks_per_page))

    # -- validation and invariants ---------------------------------------------------

    def _validate(self, block_ids: Sequence[int], verb: str, *, allow_cached: bool) -> None:
        """Raise ValueError naming every bad id in ``block_ids``; change nothing."""
        unknown, pinned, free, cached, seen, repeated = [], [], [], [], set(), []
        for b in block_ids:
            if not isinstance(b, int) or isinstance(b, bool) or not 0 <= b < self.num_blocks:
                unknown.append(b)
                continue
            if b in seen:
                repeated.append(b)
            seen.add(b)
            if b < self.num_pinned_blocks:
                pinned.append(b)
            elif b in self._cached:
                if not allow_cached:
                    cached.append(b)
            elif b not in self._used:
                free.append(b)
        problems = [
            f"{what} {ids[:16]}{'...' if len(ids) > 16 else ''}"
            for what, ids in (
                (f"unknown ids (valid: 0..{self.num_blocks - 1})", unknown),
                ("pinned null blocks", pinned),
                ("blocks not in use (double free?)", free),
                ("cached blocks, not in use", cached),
                ("repeated ids", repeated),
            )
            if ids
        ]
        if problems:
            raise ValueError(f"{verb}(): " + "; ".join(problems))

    def check_integrity(self) -> None:
        """Verify every invariant; raise :class:`PoolIntegrityError` naming the first broken one."""

        def require(ok: bool, what: str) -> None:
            if not ok:
                raise PoolIntegrityError(what)

        bpp = self.blocks_per_page
        states = self._page_state
        require(set(self._unmapped) == {p for p in range(self.num_pages) if states[p] == UNMAPPED}, "unmapped heap")
        require(len(set(self._unmapped)) == len(self._unmapped), "unmapped heap has repeats")
        counts = [states.count(s) for s in (UNMAPPED, MAPPING, MAPPED, UNMAPPING)]
        require(counts[1:] == [self.num_mapping_pages, self.num_mapped_pages, self.num_unmapping_pages], "page counts")
        require(self._used.isdisjoint(self._cached), "a block both used and cached")
        pinned = set(range(self.num_pinned_blocks))
        require(not pinned & (self._used | set(self._cached)), "a pinned block used or cached")
        num_free = 0
        mask = 0
        for count, bucket in enumerate(self._buckets):
            if bucket:
                mask |= 1 << count
        require(mask == self._bucket_mask, "bucket mask")
        require(not self._buckets[0] and not self._buckets[bpp], "pages in bucket 0 or full bucket")
        cached_set = set(self._cached)
        cached_per_page = [0] * self.num_pages
        for b in self._cached:
            cached_per_page[b // bpp] += 1
        require(cached_per_page == self._page_num_cached, "per-page cached counts")
        for page in range(self.num_pages):
            free_list = self._free_lists[page]
            blocks = set(range(page * bpp, (page + 1) * bpp))
            live = blocks & self._used
            cached = blocks & cached_set if self._page_num_cached[page] else set()
            if states[page] != MAPPED:
                require(not free_list and not live and not cached, f"page {page} (state {states[page]}) holds blocks")
                require(page not in self._empty, f"page {page} not mapped but empty")
                continue
            require(set(free_list) <= blocks and len(set(free_list)) == len(free_list), f"page {page} free list")
            on_page = pinned & blocks
            require(len(free_list) + len(live) + len(cached) + len(on_page) == bpp, f"page {page} loses blocks")
            require(not set(free_list) & (live | cached | on_page), f"page {page} free block also in use")
            count = len(free_list)
            num_free += count
            if count == bpp:
                require(page in self._empty, f"empty page {page} not in the reserve")
            else:
                require(page not in self._empty, f"page {page} in the reserve but not empty")
                require((page in self._buckets[count]) == (count > 0), f"page {page} in the wrong bucket")
            require(sum(page in b for b in self._buckets) == (0 < count < bpp), f"page {page} in several buckets")
        require(num_free == self.num_free, f"num_free {self.num_free} != {num_free}")
        require(len(self._empty) == self.num_empty_pages, "num_empty_pages")
        require(all(0 <= b < self.num_blocks for b in self._used), "used id out of range")


def _repeated(block_ids: Iterable[int]) -> list[int]:
    seen: set[int] = set()
    repeated: set[int] = set()
    for block in block_ids:
        if block in seen:
            repeated.add(block)
        seen.add(block)
    return sorted(repeated)
