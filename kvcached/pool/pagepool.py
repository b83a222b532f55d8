"""PagePool: KV blocks handed out on demand over page groups mapped on demand.

The engine side of the pool — :meth:`~PagePool.alloc`, :meth:`~PagePool.free` and the
prefix cache (:meth:`~PagePool.cache`, :meth:`~PagePool.reuse`, :meth:`~PagePool.evict`)
— over a :class:`~kvcached.pool.keeper.PageKeeper`, which keeps the reserve and the
limit. It knows nothing of tensors; :class:`~kvcached.pool.kvpool.KVPool` adds them.

The hot path — ``alloc()`` served from mapped free blocks, and ``free()`` — takes the
lock once and makes no system or driver call.
"""

from __future__ import annotations

import operator
import time
from collections.abc import Sequence

from kvcached import envs
from kvcached.pool.base import PageMapper, PoolIntegrityError, PoolStats
from kvcached.pool.keeper import EvictCallback, PageKeeper, _nonneg
from kvcached.pool.reserve import ReserveConfig

__all__ = ["EvictCallback", "PagePool"]

_DEMAND_WINDOW_S = 1.0


class PagePool(PageKeeper):
    """Page-aware KV block pool with a reserve, a limit and a prefix cache.

    Args:
        cache_limit_bytes: most bytes of cached blocks kept; beyond it the least useful
            are evicted. None: ``KVCACHED_PREFIX_CACHE_MAX`` (0 = no bound but the limit).
        Others: as :class:`PageKeeper` (mapper, num_pages, blocks_per_page, block_bytes,
            num_pinned_blocks, limit_bytes, reserve, start_thread, on_evict).

    Thread-safe. Raises as :class:`PageKeeper`.
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
        if cache_limit_bytes is None:
            cache_limit_bytes = envs.get("KVCACHED_PREFIX_CACHE_MAX") or None
        self._cache_limit_bytes = None if cache_limit_bytes is None else _nonneg(cache_limit_bytes, "cache_limit_bytes")
        self._num_denied = 0
        self._num_sync_maps = 0
        self._demand_cur = self._demand_prev = 0
        self._demand_t0 = time.monotonic()
        super().__init__(
            mapper,
            num_pages=num_pages,
            blocks_per_page=blocks_per_page,
            block_bytes=block_bytes,
            num_pinned_blocks=num_pinned_blocks,
            limit_bytes=limit_bytes,
            reserve=reserve,
            start_thread=start_thread,
            on_evict=on_evict,
        )

    # -- the hot path --------------------------------------------------------------

    def alloc(self, num_blocks: int) -> list[int] | None:
        """Hand out ``num_blocks`` blocks, or None if that is not possible now.

        None means pressure — over the limit, physical memory refused, or the capacity
        exhausted even after evicting cached blocks — and the shortfall counts in
        ``stats().demand_bytes``. Served from mapped free blocks it makes no system
        call; otherwise it maps on the caller's thread, and may evict cached blocks
        (calling ``on_evict``).

        Raises:
            ValueError: ``num_blocks`` is not a positive integer.
            PoolError: the pool is closed, or its reserve thread or mapper failed.
        """
        if num_blocks.__class__ is not int or num_blocks <= 0:
            num_blocks = _positive(num_blocks)
        lock = self._lock
        lock.acquire()  # not `with`: on the hot path `with` costs as much again
        try:
            a = self._alloc
            if num_blocks <= a.num_free and self._limit_met:
                ids = a.take(num_blocks)
                if a.num_empty_pages < self._reserve_target and not self._wake.is_set():
                    self._wake.set()  # the reserve ran low: a syscall at most once per reserve round
                return ids
        finally:
            lock.release()
        return self._alloc_slow(num_blocks)

    def free(self, block_ids: Sequence[int]) -> None:
        """Return used or cached blocks (a list of ids); their pages stay mapped until trimmed.

        Raises:
            ValueError: an id is unknown, pinned, not in use (double free) or repeated;
                nothing changed.
        """
        lock = self._lock
        lock.acquire()
        try:
            self._alloc.free(block_ids)
        finally:
            lock.release()

    # -- cached (prefix) blocks --------------------------------------------------------

    def cache(self, block_ids: Sequence[int]) -> None:
        """Keep used blocks as evictable cache (their contents stay until evicted).

        May evict older cached blocks (calling ``on_evict``) to stay under the cache bound.

        Raises:
            ValueError: an id is not in use, or repeated; nothing changed.
        """
        with self._lock:
            a = self._alloc
            a.cache(block_ids)
            if self._cache_limit_bytes is not None:
                excess = a.num_cached - self._cache_limit_bytes // self.block_bytes
                if excess > 0:
                    self._evict_locked(excess)

    def reuse(self, block_ids: Sequence[int]) -> bool:
        """Take cached blocks back into use (a prefix hit); False, and no change, if any
        of them was evicted meanwhile.

        Raises:
            ValueError: an id is unknown or repeated; nothing changed.
        """
        with self._lock:
            return self._alloc.reuse(block_ids)

    def evict(self, num_blocks: int) -> list[int]:
        """Evict up to ``num_blocks`` cached blocks, page-aware (first those whose
        eviction empties a page, least recently cached first); return their ids, which
        ``on_evict`` gets too."""
        with self._lock:
            return self._evict_locked(operator.index(num_blocks))

    def set_on_evict(self, callback: EvictCallback | None) -> None:
        """Set the eviction callback. It runs with the pool's lock held, on the thread
        that evicted (the caller of ``alloc``/``cache``/``evict``/``set_limit_bytes``, or
        the reserve thread applying a limit), before the ids can be handed out again; it
        must be quick and must not call the pool."""
        with self._lock:
            self._on_evict = callback

    # -- reporting ---------------------------------------------------------------------

    def stats(self) -> PoolStats:
        """A consistent snapshot (taken under the lock)."""
        with self._lock:
            a, bb = self._alloc, self.block_bytes
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
        """Blocks ``alloc()`` can hand out without mapping (free on mapped pages)."""
        return self._alloc.num_free

    @property
    def num_cached_blocks(self) -> int:
        return self._alloc.num_cached

    def check_integrity(self) -> None:
        """As :meth:`PageKeeper.check_integrity`, and the cache bound holds."""
        super().check_integrity()
        with self._lock:
            limit = self._cache_limit_bytes
            if limit is not None and self._alloc.num_cached * self.block_bytes > limit:
                raise PoolIntegrityError("cached blocks over the cache bound")

    # -- internals -----------------------------------------------------------------------

    def _alloc_slow(self, n: int) -> list[int] | None:
        """Free blocks first, then new pages within the limit, then evicted cached blocks."""
        a, bpp = self._alloc, self.blocks_per_page
        for _ in range(8):  # others may take what this thread mapped: try again
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
        if self._alloc.num_empty_pages < self._reserve_target and not self._wake.is_set():
            self._wake.set()
        return ids

    def _deny_locked(self, short_blocks: int) -> list[int] | None:
        self._num_denied += 1
        self._roll_demand(time.monotonic())
        self._demand_cur = max(self._demand_cur, max(short_blocks, 1) * self.block_bytes)
        self._wake.set()
        return None

    def _roll_demand(self, now: float) -> None:
        """demand_bytes: the largest shortfall seen in this window or the last one."""
        elapsed = now - self._demand_t0
        if elapsed >= _DEMAND_WINDOW_S:
            self._demand_prev = self._demand_cur if elapsed < 2 * _DEMAND_WINDOW_S else 0
            self._demand_cur = 0
            self._demand_t0 = now


def _positive(num_blocks: object) -> int:
    try:
        n = operator.index(num_blocks)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"alloc(): num_blocks must be a positive integer, got {num_blocks!r}") from None
    if n <= 0:
        raise ValueError(f"alloc(): num_blocks must be > 0, got {num_blocks!r}")
    return n
