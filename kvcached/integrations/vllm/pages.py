"""Page bookkeeping for a vLLM block pool whose block choice stays vLLM's.

vLLM's ``BlockPool`` decides which block ids to hand out (its free queue: freed blocks
without a hash first, then never-used blocks in id order, then cached blocks least
recently used first); its own tests pin that order down. :class:`VllmPages` leaves the
choice alone and keeps physical memory under exactly the blocks that need it:

* a block is *used* (``ref_cnt > 0``), *cached* (free in vLLM's eyes but holding a
  prefix-cache hash, so its contents must stay) or *free*;
* a page group is mapped before any of its blocks is handed out, and unmapped once all
  its blocks are free and it stayed so for ``trim_idle_s`` (keeping ``reserve_pages``
  empty page groups mapped ahead);
* a limit (``set_limit_bytes``) is never exceeded: lowering it unmaps empty page groups
  and asks the block pool to evict cached blocks on pages with no used block;
* capacity also counts the GPU budget's room (:attr:`budget_room`, set once the engine
  is registered), so vLLM is told "not now" instead of being handed blocks that
  cannot be mapped;
* while another engine is short of memory and this one holds more than its fair share
  (:meth:`set_share_bytes`, from the control plane), :meth:`admits_new` is False: new
  requests wait and running ones finish, so the memory flows back;
* the prefix cache keeps at most ``idle_cache_bytes`` of *cold* pages (page groups holding
  only cached blocks, untouched for ``trim_idle_s``); beyond that they are evicted and
  unmapped, busy or idle, so memory returns after a peak while the engine still serves.
* on a shared GPU (a budget is set, or ``pack="on"``) vLLM's order yields to *packing*:
  before a new page group is started (mapped, or taken from the empty reserve the
  prefetch mapped ahead), free blocks on groups in use (lowest group first)
  go to the head of vLLM's queue, and so do cached ones while the prefix cache holds more
  than ``idle_cache_bytes``. vLLM's own order hands out never-used blocks before freed
  ones, so an engine would otherwise map its whole limit while most of it holds a stale
  prefix cache, and scatter its live blocks over every group it touched; packed, what it
  maps follows what it uses and groups empty as requests finish.

Pages the scheduler is about to need (the head of vLLM's free queue) are mapped ahead
by a background thread, so allocation rarely waits for the driver. How far ahead adapts:
each time the scheduler had to map a page itself (a burst of new requests outran the
thread) the depth doubles, up to ``_AHEAD_MAX_BYTES``; each ``_AHEAD_DECAY_S`` without one
it halves back towards the base, and the idle trim returns what a burst left ahead.

Thread safety: one ``RLock`` (:attr:`lock`) guards the bookkeeping and is also the lock
the block pool and the scheduler step hold, so eviction never interleaves with a
prefix-cache lookup. Driver calls for prefetch and trim run outside it, on pages marked
``MAPPING``/``UNMAPPING`` that nobody else touches meanwhile.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable, Iterable, Sequence

from kvcached.pool.base import PageMapper, PoolStats

__all__ = ["CACHED", "FREE", "USED", "VllmPages"]

FREE, USED, CACHED = 0, 1, 2
_UNMAPPED, _MAPPING, _MAPPED, _UNMAPPING = 0, 1, 2, 3
# How far the prefetch may run ahead during a burst (a group of the 8B on a GPU is 128 MiB),
# and how soon the depth halves again once the scheduler stops having to map pages itself.
_AHEAD_MAX_PAGES, _AHEAD_MAX_BYTES, _AHEAD_DECAY_S = 16, 1 << 30, 0.5


class VllmPages:
    """Which page groups hold used or cached blocks, and their mapping.

    Args:
        mapper: maps page groups (a ``kvcached._vmm.Arena``).
        num_blocks: vLLM's ``num_gpu_blocks``; block 0 (vLLM's null block) is pinned.
        blocks_per_page: blocks in one page of each range.
        block_bytes: physical bytes of one block across all ranges.
        evict_cached: called under :attr:`lock` with block ids whose prefix-cache entries
            must go (the limit needs their pages); it must turn them into free blocks.
        trim_idle_s: how long a page group stays empty before it is unmapped.
        reserve_pages: empty page groups kept mapped ahead of demand.
        idle_cache_bytes: cold prefix cache kept mapped (None: keep every cached block).
        budget_room: bytes the GPU budget still admits (None: no budget); the control
            plane's ``EngineHandle.budget_room_bytes`` once registered.
        pack: "auto" (pack while the GPU has a budget), "on", or "off" (vLLM's order).
        start_thread: run the prefetch/trim thread (tests may drive :meth:`maintain`).
    """

    def __init__(
        self,
        mapper: PageMapper,
        *,
        num_blocks: int,
        blocks_per_page: int,
        block_bytes: int,
        evict_cached: Callable[[list[int]], None] | None = None,
        trim_idle_s: float = 0.5,
        reserve_pages: int = 1,
        idle_cache_bytes: int | None = None,
        budget_room: Callable[[], int | None] | None = None,
        pack: str = "auto",
        start_thread: bool = True,
    ) -> None:
        if num_blocks <= 0 or blocks_per_page <= 0 or block_bytes <= 0:
            raise ValueError(
                f"num_blocks, blocks_per_page and block_bytes must be > 0, got {num_blocks}, {blocks_per_page}, {block_bytes}"
            )
        if pack not in ("auto", "on", "off"):
            raise ValueError(f"pack must be 'auto', 'on' or 'off', got {pack!r}")
        self.mapper = mapper
        self.lock = threading.RLock()
        self._cond = threading.Condition(self.lock)
        self.num_blocks = num_blocks
        self.blocks_per_page = blocks_per_page
        self.block_bytes = block_bytes
        self.group_bytes = block_bytes * blocks_per_page
        self.num_pages = -(-num_blocks // blocks_per_page)
        self._tail_blocks = self.num_pages * blocks_per_page - num_blocks
        self.evict_cached = evict_cached
        self.trim_idle_s = trim_idle_s
        self.reserve_pages = reserve_pages
        self._ahead_base = 1 + max(1, reserve_pages)  # the next block's page and those after it
        self._ahead_max = max(self._ahead_base, min(_AHEAD_MAX_PAGES, _AHEAD_MAX_BYTES // max(1, self.group_bytes)))
        self._ahead_want = self._ahead_base
        self._ahead_raised = 0.0
        self._ahead_stale = False
        self.idle_cache_bytes = idle_cache_bytes  # None: keep every cached block
        self.budget_room = budget_room
        self.pack = pack
        self.share_blocks: int | None = None  # the fair share while a peer is short (set_share_bytes)
        self._budget_noted = 0.0
        self._state = bytearray(num_blocks)
        self._page = bytearray(self.num_pages)  # mapping state
        self._held = [0] * self.num_pages  # used + cached blocks per page
        self._cached = [0] * self.num_pages
        self._empty_since: dict[int, float] = {}  # mapped pages with no held block
        self._cold_since: dict[int, float] = {}  # pages whose held blocks are all cached
        self._prefetch: list[int] = []
        self._ahead: list[int] = []  # the pages of the next blocks vLLM hands out
        self._num_used = self._num_cached = self._num_mapped = 0
        self._limit_pages = self.num_pages
        self._limit_bytes: int | None = None
        self._num_denied = self._num_sync_maps = self._num_evicted = 0
        self._num_mapped_total = self._num_unmapped_total = 0
        self._demand_bytes = 0
        self._closed = False
        self._wake = threading.Event()
        self._suspended = False
        self._limit_pages_saved = self._limit_pages
        # The null block is used forever: its page never empties. The worker may have
        # mapped page group 0 already (CUDA graph capture reads the null block).
        is_mapped = getattr(mapper, "is_mapped", None)
        if is_mapped is not None and is_mapped(0):
            self._page[0] = _MAPPED
            self._num_mapped = 1
        else:
            self._map_now([0])
        self._set_states([0], USED)
        self._thread: threading.Thread | None = None
        if start_thread:
            self._thread = threading.Thread(
                target=_run, args=(weakref.ref(self), self._wake), name="kvcached-vllm-pages", daemon=True
            )
            self._thread.start()

    # -- what the block pool calls (under self.lock) -------------------------------

    def pages_of(self, block_ids: Iterable[int]) -> list[int]:
        """Distinct page groups of ``block_ids`` that are not mapped, in id order."""
        bpp, page = self.blocks_per_page, self._page
        return sorted({b // bpp for b in block_ids if page[b // bpp] != _MAPPED})

    def room_pages(self) -> int:
        """Page groups that may still be mapped under the limit and the GPU budget."""
        room = max(0, self._limit_pages - self._num_mapped)
        if self.budget_room is not None and room:
            budget = self.budget_room()
            if budget is not None:
                room = min(room, budget // self.group_bytes)
        return room

    def num_mappable_blocks(self) -> int:
        """Free blocks on unmapped pages that the limit and the budget allow to map, roughly."""
        return self.usable_blocks() - self.num_blocks_on_mapped_pages()

    def usable_blocks(self) -> int:
        """Blocks that may be handed out now, roughly: the free and cached ones on mapped
        page groups plus those of the groups the limit and the GPU budget still let us map.

        vLLM asks this once per running request per scheduler step (through
        ``get_num_free_blocks``), so it is one flat function: no lock (a stale count only
        makes the answer a step late; ``get_new_blocks`` asks again under the lock) and
        the budget read only while the limit leaves room."""
        mapped = self._num_mapped
        room = min(self.num_pages, self._limit_pages) - mapped
        if room > 0 and self.budget_room is not None:
            budget = self.budget_room()
            if budget is not None and budget < room * self.group_bytes:
                room = budget // self.group_bytes
        usable = (mapped + max(0, room)) * self.blocks_per_page - self._num_used
        if self._page[-1] == _MAPPED:
            usable -= self._tail_blocks  # ids past num_blocks on the last group do not exist
        return usable

    def note_refused(self) -> None:
        """vLLM could not place a request. If the GPU budget (not this engine's limit) is
        why, record a denial (at most every 20 ms): the control plane then asks the other
        engines to give back idle and cold pages, and to stop growing past their share."""
        limit_room = self._limit_pages - self._num_mapped
        if limit_room > 0 and self.room_pages() < min(limit_room, self.num_pages - self._num_mapped):
            now = time.monotonic()
            if now - self._budget_noted >= 0.02:
                self._budget_noted = now
                self._deny(self.group_bytes)

    def set_share_bytes(self, share_bytes: int | None) -> None:
        """This engine's fair share while another engine is short of memory (None: no
        contention). Above it, :meth:`admits_new` is False."""
        self.share_blocks = None if share_bytes is None else share_bytes // self.block_bytes

    def admits_new(self) -> bool:
        """Whether a request that holds no blocks yet may start now."""
        share = self.share_blocks
        return share is None or self._num_used - 1 < share

    def free_blocks_on_mapped_pages(self, n: int) -> list[int]:
        """Up to ``n`` block ids that need no mapping: free blocks on mapped page groups
        first, then cached ones (handing those out evicts their prefix-cache entry)."""
        free, cached, empty = self._blocks_on_mapped_pages(n, self.num_blocks, empty_is_free=True)
        return (sorted(free + empty) + cached)[:n]  # ids ascend with the page: lowest group first

    def _blocks_on_mapped_pages(
        self, n: int, max_cached: int, empty_is_free: bool
    ) -> tuple[list[int], list[int], list[int]]:
        """Blocks of mapped page groups not full of used blocks, lowest group first: free
        ones on groups that hold others, at most ``max_cached`` cached ones, and the blocks
        of groups holding none (whole groups, until there are ``n``). The scan stops once
        there are ``n`` free blocks (counting those of empty groups if ``empty_is_free``)."""
        bpp, page, state, held, cached_on = self.blocks_per_page, self._page, self._state, self._held, self._cached
        free: list[int] = []
        cached: list[int] = []
        empty: list[int] = []
        for p in range(self.num_pages):
            if page[p] != _MAPPED or held[p] - cached_on[p] == bpp:
                continue
            ids = range(p * bpp, min((p + 1) * bpp, self.num_blocks))
            if held[p] == 0:
                if len(empty) < n:
                    empty.extend(ids)
            else:
                for b in ids:
                    if state[b] == FREE:
                        free.append(b)
                    elif state[b] == CACHED and len(cached) < max_cached:
                        cached.append(b)
            if len(free) + (len(empty) if empty_is_free else 0) >= n:
                break
        return free, cached, empty

    def packs(self) -> bool:
        """Whether blocks on mapped page groups go before a new group is mapped: with
        ``pack="auto"``, while the GPU has a budget (engines share it)."""
        if self.pack != "auto":
            return self.pack == "on"
        return self.budget_room is not None and self.budget_room() is not None

    def opens_page(self, block_ids: Iterable[int]) -> bool:
        """Whether handing out ``block_ids`` starts a page group: one not mapped, or mapped
        but holding no block (the reserve the prefetch mapped ahead)."""
        bpp, page, held = self.blocks_per_page, self._page, self._held
        return any(page[b // bpp] != _MAPPED or held[b // bpp] == 0 for b in block_ids)

    def blocks_to_pack(self, n: int, include_empty: bool = True) -> list[int]:
        """Up to ``n`` blocks to hand out instead of starting a new page group, lowest group
        first: free blocks on groups that hold others, then cached blocks beyond
        ``idle_cache_bytes`` of prefix cache (none when that is None), then (with
        ``include_empty``) the blocks of empty mapped groups, which stay trimmable as long
        as possible."""
        excess = 0
        if self.idle_cache_bytes is not None:
            excess = max(0, self._num_cached - self.idle_cache_bytes // self.block_bytes)
        if self.num_blocks_on_mapped_pages() - self._num_cached <= 0 and excess == 0:
            return []
        free, cached, empty = self._blocks_on_mapped_pages(n, excess, empty_is_free=False)
        return (free + cached + (empty if include_empty else []))[:n]

    def wait(self, timeout_s: float) -> None:
        """Release :attr:`lock` for up to ``timeout_s`` (other threads may trim, map or free)."""
        self._cond.wait(timeout_s)

    def num_blocks_on_mapped_pages(self) -> int:
        """Free and cached blocks on mapped page groups (no mapping needed to use them)."""
        return self._num_mapped * self.blocks_per_page - self._num_used - self._tail_blocks_on_mapped()

    def ensure_mapped(self, pages: Sequence[int]) -> bool:
        """Map ``pages`` (waiting for any the prefetch thread is mapping). False, with
        nothing new mapped, when the limit or the device refuses."""
        pages = [p for p in pages if self._page[p] != _MAPPED]
        while any(self._page[p] in (_MAPPING, _UNMAPPING) for p in pages):
            self._cond.wait(0.05)
            pages = [p for p in pages if self._page[p] != _MAPPED]
        if not pages:
            return True
        if len(pages) > self.room_pages():
            self._deny(len(pages) * self.group_bytes)
            return False
        try:
            self._map_now(pages)
        except MemoryError:
            self._deny(len(pages) * self.group_bytes)
            return False
        self._num_sync_maps += 1
        if self._ahead_want < self._ahead_max:  # the prefetch fell behind: look further ahead
            self._ahead_want = min(self._ahead_max, 2 * self._ahead_want)
            self._ahead_stale = True
        self._ahead_raised = time.monotonic()
        return True

    def set_states(self, block_ids: Iterable[int], state: int) -> None:
        """Record that ``block_ids`` are now ``state`` (FREE, USED or CACHED)."""
        self._set_states(block_ids, state)

    def want_prefetch(self, upcoming_block_ids: Iterable[int]) -> None:
        """Ask the thread to map the pages of blocks the scheduler will likely take next
        (in the order vLLM will hand them out, read lazily): the page of the next block and
        ``max(1, reserve_pages)`` pages after it (more during a burst, see the module
        docstring), so a page is mapped before the one in use runs out. The first of them
        are also the reserve that idle trimming keeps, so the next request after a pause
        finds its page mapped."""
        bpp, want, ahead = self.blocks_per_page, self._ahead_want, list[int]()
        self._ahead_stale = False
        for i, b in enumerate(upcoming_block_ids):
            p = b // bpp
            if p not in ahead:
                ahead.append(p)
                if len(ahead) >= want:
                    break
            if i >= want * bpp:  # a queue of scattered blocks: enough looked at
                break
        self._ahead = ahead
        pages = [p for p in ahead if self._page[p] == _UNMAPPED]
        if pages:
            self._prefetch = pages
            self._wake.set()

    def ahead_mapped(self) -> bool:
        """Whether every page :meth:`want_prefetch` last asked for is mapped, being mapped
        or still waiting for the thread (False once idle trimming took one back). While
        the scheduler holds the lock the thread cannot map, so "waiting" must count: else
        every allocation of a step would look the pages ahead up again."""
        if self._ahead_stale:
            return False  # the depth grew: there are pages to add
        page, pending = self._page, self._prefetch
        return all(page[p] != _UNMAPPED or p in pending for p in self._ahead)

    # -- the limit and reporting (the control plane's view of a pool) ---------------

    def set_limit_bytes(self, limit_bytes: int | None) -> bool:
        """Set the physical limit (None: none) and apply it now. Returns whether it is met.

        Raises:
            ValueError: a negative limit; nothing changed.
        """
        if limit_bytes is not None and (not isinstance(limit_bytes, int) or limit_bytes < 0):
            raise ValueError(f"limit_bytes must be an integer >= 0 or None, got {limit_bytes!r}")
        with self.lock:
            self._limit_bytes = limit_bytes
            self._limit_pages = self.num_pages if limit_bytes is None else min(self.num_pages, limit_bytes // self.group_bytes)
            self._enforce_limit()
            return self.limit_met

    def _enforce_limit(self) -> None:
        excess = self._num_mapped - self._limit_pages
        if excess <= 0:
            return
        self._unmap_now(self._empty_pages(excess, include_reserve=True))
        excess = self._num_mapped - self._limit_pages
        if excess > 0 and self.evict_cached is not None:
            # Pages whose only holders are cached blocks: evict those, then unmap.
            victims = [p for p in range(self.num_pages) if self._page[p] == _MAPPED and p != 0
                       and self._held[p] and self._held[p] == self._cached[p]][:excess]
            if victims:
                bpp = self.blocks_per_page
                ids = [b for p in victims for b in range(p * bpp, min((p + 1) * bpp, self.num_blocks))
                       if self._state[b] == CACHED]
                self.evict_cached(ids)
                self._num_evicted += len(ids)
                self._unmap_now(self._empty_pages(excess, include_reserve=True))

    @property
    def limit_met(self) -> bool:
        return self._num_mapped <= self._limit_pages

    @property
    def limit_bytes(self) -> int | None:
        return self._limit_bytes

    def trim_reserve(self) -> int:
        """Another engine needs memory: evict the cached blocks of every page with no used
        block, and unmap every empty page group now. Returns how many were unmapped."""
        with self.lock:
            self._evict_cold_pages(0, float("inf"))
            pages = self._empty_pages(self.num_pages, include_reserve=True)
            self._unmap_now(pages)
            return len(pages)

    def _evict_cold_pages(self, keep_bytes: int, cold_before: float) -> None:
        """Evict the cached blocks of pages cold since ``cold_before`` or longer (the
        longest-cold first) until the cache-only pages still mapped take at most
        ``keep_bytes``. The bound is on pages, not cached bytes: a few cached blocks
        spread over many pages would otherwise pin whole page groups each."""
        if self.evict_cached is None:
            return
        cold = sorted(((since, p) for p, since in self._cold_since.items() if p != 0 and self._page[p] == _MAPPED))
        excess = len(cold) - keep_bytes // self.group_bytes
        bpp, victims = self.blocks_per_page, list[int]()
        for since, p in cold[: max(0, excess)]:
            if since > cold_before:
                break
            victims.extend(b for b in range(p * bpp, min((p + 1) * bpp, self.num_blocks)) if self._state[b] == CACHED)
        if victims:
            self.evict_cached(victims)
            self._num_evicted += len(victims)

    def stats(self) -> PoolStats:
        with self.lock:
            bb, gb = self.block_bytes, self.group_bytes
            num_free_mapped = self.num_blocks_on_mapped_pages() - self._num_cached
            reserve = sum(1 for p in self._empty_since if self._page[p] == _MAPPED)
            return PoolStats(
                used_bytes=(self._num_used - 1) * bb, cached_bytes=self._num_cached * bb,
                free_bytes=num_free_mapped * bb, reserve_bytes=reserve * gb,
                mapped_bytes=self._num_mapped * gb, virtual_bytes=self.num_pages * gb,
                limit_bytes=self._limit_bytes, limit_met=self.limit_met, demand_bytes=self._demand_bytes,
                block_bytes=bb, group_bytes=gb, num_blocks_total=self.num_blocks,
                num_blocks_used=self._num_used - 1, num_blocks_cached=self._num_cached,
                num_blocks_free=num_free_mapped, num_blocks_pinned=1, num_pages_mapped=self._num_mapped,
                num_allocs=0, num_frees=0, num_denied=self._num_denied, num_sync_maps=self._num_sync_maps,
                num_evicted=self._num_evicted, num_pages_mapped_total=self._num_mapped_total,
                num_pages_unmapped_total=self._num_unmapped_total,
            )

    def check_integrity(self) -> None:
        """Recount everything from the per-block states; raise AssertionError on a mismatch."""
        with self.lock:
            bpp = self.blocks_per_page
            held, cached = [0] * self.num_pages, [0] * self.num_pages
            for b, s in enumerate(self._state):
                if s != FREE:
                    held[b // bpp] += 1
                    cached[b // bpp] += s == CACHED
                    assert self._suspended or self._page[b // bpp] == _MAPPED, f"block {b} is {s} on an unmapped page"
            assert held == self._held and cached == self._cached
            assert self._num_mapped == sum(1 for s in self._page if s in (_MAPPED, _UNMAPPING))
            # A prefetch maps outside the lock: its pages may or may not be in the arena yet.
            in_flight = sum(1 for s in self._page if s == _MAPPING)
            mapped = self.mapper.mapped_bytes
            assert self._num_mapped * self.group_bytes <= mapped <= (self._num_mapped + in_flight) * self.group_bytes

    def maintain(self, now: float | None = None) -> None:
        """One round of background work: map the wanted prefetch pages, trim idle ones."""
        now = time.monotonic() if now is None else now
        with self.lock:
            pages = [p for p in self._prefetch if self._page[p] == _UNMAPPED][: self.room_pages()]
            self._prefetch = []
            for p in pages:
                self._page[p] = _MAPPING
        if pages:
            try:
                self.mapper.map(pages)
                ok = True
            except MemoryError:
                ok = False
            with self.lock:
                for p in pages:
                    self._page[p] = _MAPPED if ok else _UNMAPPED
                    if ok:
                        self._empty_since[p] = now
                if ok:
                    self._num_mapped += len(pages)
                    self._num_mapped_total += len(pages)
                self._cond.notify_all()
        with self.lock:
            if self._ahead_want > self._ahead_base and now - self._ahead_raised >= _AHEAD_DECAY_S:
                self._ahead_want = max(self._ahead_base, self._ahead_want // 2)
                self._ahead_raised = now
            if self.idle_cache_bytes is not None and len(self._cold_since) * self.group_bytes > self.idle_cache_bytes:
                # Cold cache beyond its bound goes, and the pages that frees go back at once.
                before = set(self._empty_since)
                self._evict_cold_pages(self.idle_cache_bytes, now - self.trim_idle_s)
                self._unmap_now(sorted(p for p in self._empty_since if p not in before and self._page[p] == _MAPPED))
            idle = [p for p, t in self._empty_since.items() if now - t >= self.trim_idle_s]
            keep = self.reserve_pages if len(idle) < len(self._empty_since) else min(self.reserve_pages, 1)
            kept_ahead = [p for p in self._ahead if p in self._empty_since][:keep]
            idle = sorted((p for p in idle if p not in kept_ahead), key=lambda p: -p)
            idle = idle[: max(0, len(self._empty_since) - keep)]
            if idle:
                self._unmap_now(idle)

    def suspend(self) -> None:
        """Give back every page group, the null block's too (the engine sleeps: no kernel
        runs). Cached blocks are evicted; used blocks other than the null block must not
        exist. Allocation fails until :meth:`resume`.

        Raises:
            RuntimeError: blocks are still in use.
        """
        with self.lock:
            if self._num_used > 1:
                raise RuntimeError(f"kvcached: cannot release KV memory while {self._num_used - 1} blocks are in use")
            if self._num_cached and self.evict_cached is not None:
                self.evict_cached([b for b, s in enumerate(self._state) if s == CACHED])
            self._suspended = True
            self._limit_pages_saved = self._limit_pages
            self._limit_pages = 0
            pages = [p for p in range(self.num_pages) if self._page[p] == _MAPPED]
            self._unmap_now(pages)

    def resume(self) -> None:
        """Map the null block's page group again and allow allocation."""
        with self.lock:
            if not self._suspended:
                return
            self._limit_pages = self._limit_pages_saved
            self._map_now([0])
            self._suspended = False

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=2)

    # -- internals --------------------------------------------------------------------

    def _tail_blocks_on_mapped(self) -> int:
        # The last page group may extend past num_blocks: those ids do not exist.
        return self._tail_blocks if self._page[-1] == _MAPPED else 0

    def _set_states(self, block_ids: Iterable[int], state: int) -> None:
        st, bpp, held, cached, empty = self._state, self.blocks_per_page, self._held, self._cached, self._empty_since
        cold = self._cold_since
        now = time.monotonic()
        for b in block_ids:
            old = st[b]
            if old == state:
                continue
            st[b] = state
            p = b // bpp
            if old == USED:
                self._num_used -= 1
            elif old == CACHED:
                self._num_cached -= 1
                cached[p] -= 1
            if state == USED:
                self._num_used += 1
            elif state == CACHED:
                self._num_cached += 1
                cached[p] += 1
            if old == FREE:
                held[p] += 1
                empty.pop(p, None)
            elif state == FREE:
                held[p] -= 1
                if held[p] == 0:
                    empty[p] = now
            if held[p] and held[p] == cached[p]:
                cold.setdefault(p, now)  # only cached blocks left: cold from now on
            else:
                cold.pop(p, None)

    def _empty_pages(self, n: int, include_reserve: bool) -> list[int]:
        pages = sorted((p for p in self._empty_since if self._page[p] == _MAPPED), key=lambda p: -p)
        if not include_reserve:
            pages = pages[self.reserve_pages:]
        return pages[:n]

    def _map_now(self, pages: list[int]) -> None:
        self.mapper.map(pages)
        now = time.monotonic()
        for p in pages:
            self._page[p] = _MAPPED
            if self._held[p] == 0:
                self._empty_since[p] = now
        self._num_mapped += len(pages)
        self._num_mapped_total += len(pages)

    def _unmap_now(self, pages: list[int]) -> None:
        if not pages:
            return
        self.mapper.unmap(pages)
        for p in pages:
            self._page[p] = _UNMAPPED
            self._empty_since.pop(p, None)
        self._num_mapped -= len(pages)
        self._num_unmapped_total += len(pages)

    def _deny(self, shortfall_bytes: int) -> None:
        self._num_denied += 1
        self._demand_bytes = shortfall_bytes


def _run(ref: weakref.ref[VllmPages], wake: threading.Event) -> None:
    while True:
        pages = ref()
        if pages is None or pages._closed:
            return
        tick = min(0.05, max(0.005, pages.trim_idle_s / 4))
        del pages
        wake.wait(tick)
        wake.clear()
        pages = ref()
        if pages is None or pages._closed:
            return
        pages.maintain()
        del pages
