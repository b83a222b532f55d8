"""Page bookkeeping for a vLLM block pool whose block choice stays vLLM's.

vLLM's ``BlockPool`` decides which block ids to hand out (its free queue: freed blocks
without a hash first, then never-used blocks in id order, then cached blocks least
recently used first); its own tests pin that order down. :class:`VllmPages` leaves the
choice alone and keeps physical memory under exactly the blocks that need it:

* a block is *used*, *cached* or *free* (:mod:`~kvcached.integrations.vllm.states`);
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
* the prefix cache keeps at most ``idle_cache_bytes`` of *cold* page groups, busy or idle;
* on a shared GPU the block pool hands out blocks on mapped page groups before it starts
  a new one (*packing*, :mod:`~kvcached.integrations.vllm.placement`).

Pages the scheduler is about to need (the head of vLLM's free queue) are mapped ahead by a
background thread (:mod:`~kvcached.integrations.vllm.upkeep`; how far ahead:
:mod:`~kvcached.integrations.vllm.ahead`), so allocation rarely waits for the driver.

Thread safety: one ``RLock`` (:attr:`lock`) guards the bookkeeping and is also the lock
the block pool and the scheduler step hold, so eviction never interleaves with a
prefix-cache lookup. Driver calls for prefetch and trim run outside it (see ``states``).
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable, Iterable, Sequence

from kvcached.integrations.vllm import accounting, upkeep
from kvcached.integrations.vllm.ahead import Ahead
from kvcached.integrations.vllm.states import CACHED, FREE, MAPPED, MAPPING, UNMAPPED, UNMAPPING, USED
from kvcached.pool.base import PageMapper, PoolStats

__all__ = ["CACHED", "FREE", "USED", "VllmPages"]



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
        self.idle_cache_bytes = idle_cache_bytes  # None: keep every cached block
        self.budget_room = budget_room
        self.pack = pack
        self.share_blocks: int | None = None  # the fair share while a peer is short (set_share_bytes)
        self._budget_noted = 0.0
        self.block_state = bytearray(num_blocks)
        self.page_state = bytearray(self.num_pages)  # mapping state
        self.held = [0] * self.num_pages  # used + cached blocks per page
        self.cached_on = [0] * self.num_pages
        # 1: a prefix-cache hit reused the block's contents since it was last handed out.
        # Packing never evicts those (placement): a shared prefix is worth its page group.
        self.reused = bytearray(num_blocks)
        self._empty_since: dict[int, float] = {}  # mapped pages with no held block
        self._cold_since: dict[int, float] = {}  # pages whose held blocks are all cached
        self._prefetch: list[int] = []
        self._ahead = Ahead(reserve_pages, self.group_bytes)  # the pages of the next blocks vLLM hands out
        self._num_used = self.num_cached = self._num_mapped = 0
        self._limit_pages = self.num_pages
        self._limit_bytes: int | None = None
        self._num_denied = self._num_sync_maps = self._num_evicted = 0
        self._num_mapped_total = self._num_unmapped_total = 0
        self._demand_bytes = 0
        self._closed = False
        self._wake = threading.Event()
        self._limit_pending = False  # an unmet limit to apply again in the next round (enforce_soon)
        self._suspended = False
        self._limit_pages_saved = self._limit_pages
        # The null block is used forever: its page never empties. The worker may have
        # mapped page group 0 already (CUDA graph capture reads the null block).
        is_mapped = getattr(mapper, "is_mapped", None)
        if is_mapped is not None and is_mapped(0):
            self.page_state[0] = MAPPED
            self._num_mapped = 1
        else:
            self._map_now([0])
        self._set_states([0], USED)
        self._thread: threading.Thread | None = None
        if start_thread:
            self._thread = threading.Thread(
                target=upkeep.run, args=(weakref.ref(self), self._wake), name="kvcached-vllm-pages", daemon=True
            )
            self._thread.start()

    # -- what the block pool calls (under self.lock) -------------------------------

    def pages_of(self, block_ids: Iterable[int]) -> list[int]:
        """Distinct page groups of ``block_ids`` that are not mapped, in id order."""
        bpp, page = self.blocks_per_page, self.page_state
        return sorted({b // bpp for b in block_ids if page[b // bpp] != MAPPED})

    def room_pages(self) -> int:
        """Page groups that may still be mapped under the limit and the GPU budget."""
        room = max(0, self._limit_pages - self._num_mapped)
        if self.budget_room is not None and room:
            budget = self.budget_room()
            if budget is not None:
                room = min(room, budget // self.group_bytes)
        return room

    def usable_blocks(self) -> int:
        """Blocks that may be handed out now, roughly: the free and cached ones on mapped
        page groups plus those of the groups the limit and the GPU budget still let us map.

        vLLM asks this once per running request per scheduler step (through
        ``get_num_free_blocks``), so it takes no lock: a stale count only makes the answer
        a step late, and ``get_new_blocks`` asks again under the lock."""
        usable = (self._num_mapped + self.room_pages()) * self.blocks_per_page - self._num_used
        if self.page_state[-1] == MAPPED:
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

    def wait(self, timeout_s: float) -> None:
        """Release :attr:`lock` for up to ``timeout_s`` (other threads may trim, map or free)."""
        self._cond.wait(timeout_s)

    def num_blocks_on_mapped_pages(self) -> int:
        """Free and cached blocks on mapped page groups (no mapping needed to use them)."""
        return self._num_mapped * self.blocks_per_page - self._num_used - self._tail_blocks_on_mapped()

    def mapped_empty_pages(self) -> list[int]:
        """Mapped page groups holding no block (the reserve, and groups waiting for trim)."""
        return [p for p in self._empty_since if self.page_state[p] == MAPPED]

    def num_blocks_on_held_pages(self) -> int:
        """Free and cached blocks on mapped page groups that hold at least one block."""
        empty = self.mapped_empty_pages()
        tail = self._tail_blocks if self.num_pages - 1 in empty else 0
        return self.num_blocks_on_mapped_pages() - len(empty) * self.blocks_per_page + tail

    def ensure_mapped(self, pages: Sequence[int]) -> bool:
        """Map ``pages`` (waiting for any the prefetch thread is mapping). False, with
        nothing new mapped, when the limit or the device refuses."""
        pages = [p for p in pages if self.page_state[p] != MAPPED]
        while any(self.page_state[p] in (MAPPING, UNMAPPING) for p in pages):
            self._cond.wait(0.05)
            pages = [p for p in pages if self.page_state[p] != MAPPED]
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
        self._ahead.fell_behind(time.monotonic())  # the prefetch fell behind: look further ahead
        return True

    def set_states(self, block_ids: Iterable[int], state: int) -> None:
        """Record that ``block_ids`` are now ``state`` (FREE, USED or CACHED)."""
        self._set_states(block_ids, state)

    def want_prefetch(self, upcoming_block_ids: Iterable[int]) -> None:
        """Ask the thread to map the pages of blocks the scheduler will likely take next
        (in the order vLLM will hand them out, read lazily; how many: :class:`Ahead`), so a
        page is mapped before the one in use runs out. The first of them are also the
        reserve that idle trimming keeps, so the next request after a pause finds its page
        mapped."""
        ahead = self._ahead.pick(upcoming_block_ids, self.blocks_per_page)
        pages = [p for p in ahead if self.page_state[p] == UNMAPPED]
        if pages:
            self._prefetch = pages
            self._wake.set()

    def ahead_mapped(self) -> bool:
        """Whether every page :meth:`want_prefetch` last asked for is mapped, being mapped
        or still waiting for the thread (False once idle trimming took one back, or the
        depth grew). While the scheduler holds the lock the thread cannot map, so "waiting"
        must count: else every allocation of a step would look the pages ahead up again."""
        if self._ahead.stale:
            return False
        page, pending = self.page_state, self._prefetch
        return all(page[p] != UNMAPPED or p in pending for p in self._ahead.pages)

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
            going = upkeep.enforce_limit(self)
        self._finish_unmap(going)  # outside the lock (unless the caller holds it): the scheduler goes on
        return self.limit_met

    def enforce_soon(self) -> None:
        """Apply the limit again in the background thread's next round (woken now): blocks
        were freed while it was unmet. The block pool calls this with the scheduler holding
        the lock, where unmapping (~2 ms per page group) would hold up the step."""
        self._limit_pending = True
        self._wake.set()

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
            upkeep.evict_cold_pages(self, 0, float("inf"))
            going = self._begin_unmap(self._empty_pages(self.num_pages, include_reserve=True))
        self._finish_unmap(going)  # outside the lock, as the idle trim
        return len(going)

    def maintain(self, now: float | None = None) -> None:
        """One round of the background thread's work (:func:`upkeep.maintain`)."""
        upkeep.maintain(self, time.monotonic() if now is None else now)

    def stats(self) -> PoolStats:
        return accounting.stats(self)

    def check_integrity(self) -> None:
        """Recount everything from the per-block states (:func:`accounting.check_integrity`)."""
        accounting.check_integrity(self)

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
            if self.num_cached and self.evict_cached is not None:
                self.evict_cached([b for b, s in enumerate(self.block_state) if s == CACHED])
            self._suspended = True
            self._limit_pages_saved = self._limit_pages
            self._limit_pages = 0
            pages = [p for p in range(self.num_pages) if self.page_state[p] == MAPPED]
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
        return self._tail_blocks if self.page_state[-1] == MAPPED else 0

    def _set_states(self, block_ids: Iterable[int], state: int) -> None:
        st, bpp, held, cached, empty = self.block_state, self.blocks_per_page, self.held, self.cached_on, self._empty_since
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
                self.num_cached -= 1
                cached[p] -= 1
            if state == USED:
                self._num_used += 1
            elif state == CACHED:
                self.num_cached += 1
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
        pages = sorted(self.mapped_empty_pages(), reverse=True)
        if not include_reserve:
            pages = pages[self.reserve_pages:]
        return pages[:n]

    def _map_now(self, pages: list[int]) -> None:
        self.mapper.map(pages)
        self._record_mapped(pages, time.monotonic())

    def _record_mapped(self, pages: list[int], now: float) -> None:
        """Under the lock: ``pages`` are mapped now (by :meth:`_map_now` or the prefetch)."""
        for p in pages:
            self.page_state[p] = MAPPED
            if self.held[p] == 0:
                self._empty_since[p] = now
        self._num_mapped += len(pages)
        self._num_mapped_total += len(pages)

    def _begin_unmap(self, pages: list[int]) -> list[int]:
        """Under the lock: mark ``pages`` as being unmapped, so that nobody hands out their
        blocks or maps them until :meth:`_finish_unmap` (called without the lock)."""
        for p in pages:
            self.page_state[p] = UNMAPPING
            self._empty_since.pop(p, None)
        return pages

    def _finish_unmap(self, pages: list[int]) -> None:
        """Without the lock: unmap ``pages`` (from :meth:`_begin_unmap`), then record it."""
        if not pages:
            return
        try:
            self.mapper.unmap(pages)
        except BaseException:
            with self.lock:  # nothing was given back: the pages stay mapped
                now = time.monotonic()
                for p in pages:
                    self.page_state[p] = MAPPED
                    if self.held[p] == 0:
                        self._empty_since[p] = now
                self._cond.notify_all()
            raise
        with self.lock:
            for p in pages:
                self.page_state[p] = UNMAPPED
            self._num_mapped -= len(pages)
            self._num_unmapped_total += len(pages)
            self._cond.notify_all()

    def _unmap_now(self, pages: list[int]) -> None:
        """Unmap ``pages`` while the caller keeps holding the lock (suspend: the engine
        sleeps, no scheduler step waits)."""
        self._finish_unmap(self._begin_unmap(pages))

    def _deny(self, shortfall_bytes: int) -> None:
        self._num_denied += 1
        self._demand_bytes = shortfall_bytes
