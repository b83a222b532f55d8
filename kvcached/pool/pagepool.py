"""The elastic block pool: blocks handed out on demand over page groups mapped on demand.

:class:`PagePool` joins a :class:`~kvcached.pool.allocator.BlockAllocator` (the
bookkeeping), a :class:`~kvcached.pool.base.PageMapper` (the physical memory), a
physical limit and the reserve (:mod:`kvcached.pool.reserve`). It knows nothing of
tensors; :class:`~kvcached.pool.kvpool.KVPool` adds them.

Threads: every public method is thread-safe. One lock guards the bookkeeping and is
never held across a map or unmap: pages are claimed under the lock, mapped or unmapped
outside it, then published (or put back) under it. The hot path — :meth:`alloc` served
from free blocks, and :meth:`free` — takes the lock once and makes no system or driver
call.
"""

from __future__ import annotations

import operator
import threading
import time
from collections.abc import Callable, Sequence

from kvcached import envs
from kvcached.pool.allocator import BlockAllocator, PoolIntegrityError
from kvcached.pool.base import PageMapper, PoolError, PoolStats
from kvcached.pool.reserve import ReserveConfig, ReservePolicy, ReserveThread

__all__ = ["PagePool", "EvictCallback"]

EvictCallback = Callable[[list[int]], None]
_DEMAND_WINDOW_S = 1.0


class PagePool:
    """Page-aware KV block pool over a page mapper, with a reserve, a limit and a prefix cache.

    Args:
        mapper: maps page groups (``kvcached._vmm.Arena`` or a forwarding mapper).
        num_pages: page groups in the mapper's address space.
        blocks_per_page: blocks per page group; block ``b`` lives on page ``b // blocks_per_page``.
        block_bytes: physical bytes of one block (all layers, K and V).
        num_pinned_blocks: the first blocks, never handed out and always mapped (the
            engines' null/padding block; reading it must never fault).
        cache_limit_bytes: most bytes of cached blocks kept; beyond it the least useful are
            evicted. None: ``KVCACHED_PREFIX_CACHE_MAX`` (0 = no bound but the limit).
        limit_bytes: the initial physical limit (None: none).
        reserve: reserve sizing; None: :meth:`ReserveConfig.from_env`.
        start_thread: run the reserve in a background thread; if False the caller calls
            :meth:`maintain` itself (tests, benchmarks, engines with their own loop).
        on_evict: called with the ids of cached blocks the pool evicts (see :meth:`set_on_evict`).

    Raises:
        MemoryError: the pinned page could not be mapped.
        ValueError: a bad size or count.
    """

    def __init__(
        self,
        mapper: PageMapper,
        *,
        num_pages: int,
        blocks_per_page: int,
        block_bytes: int,
        num_pinned_blocks: int = 1,
        cache_limit_bytes: int | None = None,
        limit_bytes: int | None = None,
        reserve: ReserveConfig | None = None,
        start_thread: bool = True,
        on_evict: EvictCallback | None = None,
    ) -> None:
        if not isinstance(block_bytes, int) or block_bytes <= 0:
            raise ValueError(f"block_bytes must be a positive integer, got {block_bytes!r}")
        self._alloc = BlockAllocator(num_pages, blocks_per_page, num_pinned_blocks)
        self._mapper = mapper
        self.num_pages = num_pages
        self.blocks_per_page = blocks_per_page
        self.block_bytes = block_bytes
        self.group_bytes = block_bytes * blocks_per_page
        self.num_blocks = num_pages * blocks_per_page
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._wake = threading.Event()
        self._config = reserve if reserve is not None else ReserveConfig.from_env()
        self._policy = ReservePolicy(self._config, time.monotonic())
        self._reserve_target = self._config.min_pages
        if cache_limit_bytes is None:
            cache_limit_bytes = envs.get("KVCACHED_PREFIX_CACHE_MAX") or None
        self._cache_limit_blocks = None if cache_limit_bytes is None else _nonneg(cache_limit_bytes, "cache_limit_bytes") // block_bytes
        self._limit_bytes: int | None = None
        self._limit_pages = num_pages
        self._limit_met = True
        self._on_met: Callable[[], None] | None = None
        self._on_evict = on_evict
        self._num_denied = 0
        self._num_sync_maps = 0
        self._num_pages_mapped_total = 0
        self._num_pages_unmapped_total = 0
        self._demand_cur = self._demand_prev = 0
        self._demand_t0 = time.monotonic()
        self._thread_error: BaseException | None = None
        self._closed = False
        pinned_pages = self._alloc.claim_unmapped(-(-num_pinned_blocks // blocks_per_page))
        if pinned_pages and not self._map(pinned_pages):
            raise MemoryError(f"cannot map the pinned page group ({self.group_bytes} bytes)")
        if limit_bytes is not None:
            self.set_limit_bytes(limit_bytes)
        self.maintain()
        self._thread: ReserveThread | None = None
        if start_thread:
            self._thread = ReserveThread(self, self._wake, self._config)
            self._thread.start()

    # -- the hot path --------------------------------------------------------------

    def alloc(self, num_blocks: int) -> list[int] | None:
        """Hand out ``num_blocks`` blocks, or None if that is not possible now.

        None means pressure: over the limit, physical memory refused, or capacity
        exhausted even after evicting cached blocks; the request counts in ``demand_bytes``.
        Served from mapped free blocks it makes no system call; otherwise it maps on
        the caller's thread (and may evict cached blocks, calling ``on_evict``).

        Raises:
            ValueError: ``num_blocks`` is not a positive integer.
            PoolError: the pool is closed, or its reserve thread or mapper failed.
        """
        n = operator.index(num_blocks)
        if n <= 0:
            raise ValueError(f"alloc(): num_blocks must be > 0, got {num_blocks!r}")
        with self._lock:
            a = self._alloc
            if n <= a.num_free and self._limit_met:
                ids = a.take(n)
                if a.num_empty_pages < self._reserve_target:
                    self._wake.set()
                return ids
        return self._alloc_slow(n)

    def free(self, block_ids: Sequence[int]) -> None:
        """Return used or cached blocks (a list of ids); their pages stay mapped until trimmed.

        Raises:
            ValueError: an id is unknown, pinned, not in use (double free) or repeated;
                nothing changed.
        """
        with self._lock:
            self._alloc.free(block_ids)

    # -- cached (prefix) blocks --------------------------------------------------------

    def cache(self, block_ids: Sequence[int]) -> None:
        """Keep used blocks as evictable cache (the engine keeps their contents' hashes).

        May evict older cached blocks (calling ``on_evict``) to stay under the cache bound.

        Raises:
            ValueError: an id is not in use, or repeated; nothing changed.
        """
        with self._lock:
            a = self._alloc
            a.cache(block_ids)
            limit = self._cache_limit_blocks
            if limit is not None and a.num_cached > limit:
                self._evict_locked(a.num_cached - limit)

    def reuse(self, block_ids: Sequence[int]) -> bool:
        """Take cached blocks back into use (a prefix hit); False, and no change, if any
        of them was evicted meanwhile.

        Raises:
            ValueError: an id is unknown or repeated; nothing changed.
        """
        with self._lock:
            return self._alloc.reuse(block_ids)

    def evict(self, num_blocks: int) -> list[int]:
        """Evict up to ``num_blocks`` cached blocks, page-aware (blocks whose eviction
        empties a page first, least recently cached first); return their ids.
        ``on_evict`` is called with them too."""
        with self._lock:
            return self._evict_locked(operator.index(num_blocks))

    def set_on_evict(self, callback: EvictCallback | None) -> None:
        """Set the eviction callback. It is called with the pool's lock held, on the
        thread that evicted (the caller of :meth:`alloc`/:meth:`cache`/:meth:`evict`, or
        the thread applying a limit), before the ids can be handed out again; it must
        be quick and must not call the pool."""
        with self._lock:
            self._on_evict = callback

    # -- the limit ---------------------------------------------------------------------

    def set_limit_bytes(self, limit_bytes: int | None, on_met: Callable[[], None] | None = None) -> bool:
        """Set the physical limit (None: none) and apply it now.

        Lowering it unmaps empty page groups, then evicts cached blocks of pages with
        no used block and unmaps those; while live blocks keep the pool over the limit
        :meth:`alloc` returns None, and the reserve thread keeps returning pages as
        they empty. Never maps beyond the limit. The pinned page group always stays,
        so a limit under one page group is never met.

        Args:
            on_met: called once, without the lock, when the limit is met (perhaps
                before this returns); replaces a pending one.

        Returns:
            Whether the limit is met now.

        Raises:
            ValueError: a negative or non-integer limit; nothing changed.
        """
        if limit_bytes is not None:
            limit_bytes = _nonneg(limit_bytes, "limit_bytes")
        with self._lock:
            self._limit_bytes = limit_bytes
            self._limit_pages = self.num_pages if limit_bytes is None else min(limit_bytes // self.group_bytes, self.num_pages)
            self._on_met = on_met
            pages = self._claim_over_limit_locked()
            self._refresh_limit_locked()
        if pages:
            self._unmap(pages)
        self._fire_met()
        return self.limit_met

    @property
    def limit_met(self) -> bool:
        """Whether the pool holds no more physical memory than its limit."""
        return self._limit_met

    @property
    def limit_bytes(self) -> int | None:
        return self._limit_bytes

    # -- maintenance -------------------------------------------------------------------

    def maintain(self, now: float | None = None) -> bool:
        """One round of background work: size the reserve from the draw rate, map or
        trim empty page groups, apply the limit. The reserve thread calls it; call it
        yourself if the pool was made with ``start_thread=False``.

        Returns:
            Whether the pool is busy (allocations recently, or work done): the thread
            then comes back sooner.
        """
        a = self._alloc
        with self._lock:
            if self._closed:
                return False
            plan = self._policy.plan(time.monotonic() if now is None else now, a.num_reserve_draws, a.num_allocs)
            self._reserve_target = plan.target_pages
            pages = self._claim_over_limit_locked()
            if not pages and a.num_empty_pages > plan.keep_pages:
                pages = a.claim_empty(a.num_empty_pages - plan.keep_pages)
            self._refresh_limit_locked()
        busy = bool(pages)
        if pages:
            self._unmap(pages)
        while True:
            with self._lock:
                want = plan.target_pages - a.num_empty_pages - a.num_mapping_pages
                room = self._limit_pages - a.num_held_pages
                count = min(want, room, self._config.map_batch_pages)
                if self._closed or count <= 0:
                    break
                pages = a.claim_unmapped(count)
                self._refresh_limit_locked()
            if not pages or not self._map(pages):
                break
            busy = True
        self._fire_met()
        return busy or not plan.idle

    # -- reporting ---------------------------------------------------------------------

    def stats(self) -> PoolStats:
        """A consistent snapshot (taken under the lock)."""
        with self._lock:
            a = self._alloc
            bb = self.block_bytes
            self._roll_demand(time.monotonic())
            return PoolStats(
                used_bytes=a.num_used * bb,
                cached_bytes=a.num_cached * bb,
                free_bytes=a.num_free * bb,
                reserve_bytes=a.num_empty_pages * self.group_bytes,
                mapped_bytes=a.num_held_pages * self.group_bytes,
                virtual_bytes=self.num_pages * self.group_bytes,
                limit_bytes=self._limit_bytes,
                limit_met=self._limit_met,
                demand_bytes=max(self._demand_cur, self._demand_prev),
                block_bytes=bb,
                group_bytes=self.group_bytes,
                num_blocks_total=self.num_blocks,
                num_blocks_used=a.num_used,
                num_blocks_cached=a.num_cached,
                num_blocks_free=a.num_free,
                num_blocks_pinned=a.num_pinned_blocks,
                num_pages_mapped=a.num_held_pages,
                num_allocs=a.num_allocs,
                num_frees=a.num_frees,
                num_denied=self._num_denied,
                num_sync_maps=self._num_sync_maps,
                num_evicted=a.num_evicted,
                num_pages_mapped_total=self._num_pages_mapped_total,
                num_pages_unmapped_total=self._num_pages_unmapped_total,
            )

    @property
    def num_free_blocks(self) -> int:
        """Blocks :meth:`alloc` can hand out without mapping (free on mapped pages)."""
        return self._alloc.num_free

    @property
    def num_cached_blocks(self) -> int:
        return self._alloc.num_cached

    def check_integrity(self) -> None:
        """Verify the bookkeeping and, when no map/unmap is in flight, that it agrees
        with the mapper's ``mapped_bytes``. Raises :class:`PoolIntegrityError`."""
        with self._lock:
            self._raise_if_unusable(closed_ok=True)
            a = self._alloc
            a.check_integrity()
            if a.num_mapping_pages == a.num_unmapping_pages == 0 and not self._closed:
                mapped = a.num_mapped_pages * self.group_bytes
                if self._mapper.mapped_bytes != mapped:
                    raise PoolIntegrityError(f"mapper maps {self._mapper.mapped_bytes} bytes, pool counts {mapped}")
                blocks = a.num_used + a.num_cached + a.num_free + a.num_pinned_blocks
                if blocks * self.block_bytes != mapped:
                    raise PoolIntegrityError(f"{blocks} blocks accounted on {a.num_mapped_pages} mapped pages")
            if self._limit_met != (a.num_held_pages <= self._limit_pages):
                raise PoolIntegrityError("limit_met flag stale")
            if self._cache_limit_blocks is not None and a.num_cached > self._cache_limit_blocks:
                raise PoolIntegrityError("cached blocks over the cache bound")

    def close(self) -> None:
        """Stop the reserve thread; later calls to :meth:`alloc` raise. Idempotent.
        Subclasses release the memory (the mapper is not touched here)."""
        with self._lock:
            self._closed = True
            self._limit_met = False  # sends alloc() to the slow path, which raises
        if self._thread is not None:
            self._thread.stop()

    # -- internals -----------------------------------------------------------------------

    def _alloc_slow(self, n: int) -> list[int] | None:
        a, bpp = self._alloc, self.blocks_per_page
        for _ in range(8):
            with self._cond:
                self._raise_if_unusable()
                if not self._limit_met:
                    return self._deny_locked(n)
                if n <= a.num_free:
                    return self._take_locked(n)
                need = -(-(n - a.num_free) // bpp)
                room = max(0, min(self._limit_pages - a.num_held_pages, a.num_unmapped_pages))
                if need > room:
                    if a.num_mapping_pages:  # the reserve thread's pages may be enough
                        self._cond.wait(0.05)
                        continue
                    short = n - a.num_free - room * bpp
                    if short > a.num_cached:
                        return self._deny_locked(short - a.num_cached)
                    self._evict_locked(short)
                    if n <= a.num_free:
                        return self._take_locked(n)
                    need = -(-(n - a.num_free) // bpp)
                pages = a.claim_unmapped(need)
                self._num_sync_maps += 1
                self._refresh_limit_locked()
            mapped = self._map(pages)
            with self._cond:
                if not mapped:  # physical memory refused: fall back on the cache
                    if self._limit_met and n <= a.num_free + a.num_cached:
                        self._evict_locked(n - a.num_free)
                        return self._take_locked(n)
                    return self._deny_locked(n - a.num_free - a.num_cached)
                if self._limit_met and n <= a.num_free:
                    return self._take_locked(n)
        with self._lock:
            return self._deny_locked(n)

    def _take_locked(self, n: int) -> list[int]:
        ids = self._alloc.take(n)
        if self._alloc.num_empty_pages < self._reserve_target:
            self._wake.set()
        return ids

    def _deny_locked(self, short_blocks: int) -> None:
        self._num_denied += 1
        self._roll_demand(time.monotonic())
        self._demand_cur = max(self._demand_cur, max(short_blocks, 1) * self.block_bytes)
        self._wake.set()
        return None

    def _roll_demand(self, now: float) -> None:
        elapsed = now - self._demand_t0
        if elapsed >= _DEMAND_WINDOW_S:
            self._demand_prev = self._demand_cur if elapsed < 2 * _DEMAND_WINDOW_S else 0
            self._demand_cur = 0
            self._demand_t0 = now

    def _evict_locked(self, num_blocks: int) -> list[int]:
        victims = self._alloc.evict(num_blocks)
        if victims and self._on_evict is not None:
            self._on_evict(victims)
        return victims

    def _claim_over_limit_locked(self) -> list[int]:
        """Claim empty pages to unmap until under the limit, evicting cache-only pages if needed."""
        a = self._alloc
        excess = a.num_mapped_pages + a.num_mapping_pages - self._limit_pages
        if excess <= 0:
            return []
        pages = a.claim_empty(excess)
        excess -= len(pages)
        if excess > 0 and a.num_cached:
            victims = a.evict_pages(excess)
            if victims:
                if self._on_evict is not None:
                    self._on_evict(victims)
                pages += a.claim_empty(excess)
        return pages

    def _refresh_limit_locked(self) -> None:
        self._limit_met = not self._closed and self._alloc.num_held_pages <= self._limit_pages

    def _fire_met(self) -> None:
        with self._lock:
            callback = self._on_met if self._limit_met else None
            if callback is not None:
                self._on_met = None
        if callback is not None:
            callback()

    def _map(self, pages: list[int]) -> bool:
        """Map claimed pages outside the lock and publish them; False if memory was refused."""
        try:
            self._mapper.map(pages)
        except BaseException as exc:
            with self._cond:
                self._alloc.abandon(pages)
                self._refresh_limit_locked()
                self._cond.notify_all()
            if isinstance(exc, MemoryError):
                return False
            raise
        with self._cond:
            self._alloc.publish(pages)
            self._num_pages_mapped_total += len(pages)
            self._refresh_limit_locked()
            self._cond.notify_all()
        return True

    def _unmap(self, pages: list[int]) -> None:
        try:
            self._mapper.unmap(pages)
        except BaseException:
            with self._cond:
                self._alloc.restore(pages)
                self._refresh_limit_locked()
                self._cond.notify_all()
            raise
        with self._cond:
            self._alloc.retire(pages)
            self._num_pages_unmapped_total += len(pages)
            self._refresh_limit_locked()
            self._cond.notify_all()

    def _raise_if_unusable(self, closed_ok: bool = False) -> None:
        if self._closed and not closed_ok:
            raise PoolError("the pool is closed")
        if self._thread_error is not None:
            raise PoolError(f"the reserve thread failed: {self._thread_error!r}") from self._thread_error

    def _thread_failed(self, exc: BaseException) -> None:
        with self._lock:
            self._thread_error = exc


def _nonneg(value: object, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0 (bytes), got {value!r}")
    return value
