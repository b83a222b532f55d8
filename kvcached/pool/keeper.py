"""PageKeeper: keeps the right page groups mapped — a reserve ahead of demand, never
more than the limit.

The memory side of the pool. It owns the lock, the :class:`BlockAllocator` (the
bookkeeping) and the :class:`PageMapper` (the physical memory), sizes the reserve with
a :class:`ReservePolicy` (from a background :class:`ReserveThread` or the caller's
:meth:`maintain`), and applies the physical limit. :class:`~kvcached.pool.pagepool.PagePool`
adds the engine side: handing out blocks.

Locking: one lock guards the bookkeeping, and it is never held across a map or an
unmap — pages are claimed under it (``MAPPING``/``UNMAPPING``), mapped or unmapped
outside it, then published or retired under it. Claimed pages count against the limit.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from kvcached.pool.allocator import BlockAllocator
from kvcached.pool.base import PageMapper, PoolError, PoolIntegrityError
from kvcached.pool.reserve import ReserveConfig, ReservePolicy, ReserveThread

__all__ = ["EvictCallback", "PageKeeper"]

EvictCallback = Callable[[list[int]], None]


class PageKeeper:
    """Reserve, limit and mapping of one pool's page groups. Every public method is thread-safe.

    Args:
        mapper: maps page groups (``kvcached._vmm.Arena`` or a forwarding mapper).
        num_pages: page groups in the mapper's address space.
        blocks_per_page: blocks per page group; block ``b`` lives on page ``b // blocks_per_page``.
        block_bytes: physical bytes of one block (all layers, K and V).
        num_pinned_blocks: the first blocks, never handed out and always mapped (the
            engines' null/padding block: reading it must never fault).
        limit_bytes: the initial physical limit (None: none).
        reserve: reserve sizing; None: :meth:`ReserveConfig.from_env`.
        start_thread: keep the reserve from a background thread; if False the caller
            calls :meth:`maintain` (tests, benchmarks, engines with their own loop).
        on_evict: called with the ids of cached blocks the pool evicts (see ``set_on_evict``).

    Raises:
        MemoryError: the pinned page group could not be mapped.
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
        self._cond = threading.Condition(self._lock)  # notified when pages land or leave
        self._wake = threading.Event()  # wakes the reserve thread early
        self._config = reserve if reserve is not None else ReserveConfig.from_env()
        self._policy = ReservePolicy(self._config, time.monotonic())
        self._reserve_target = self._config.min_pages  # alloc() wakes the thread below it
        self._limit_bytes: int | None = None
        self._limit_pages = num_pages
        self._limit_met = True  # held pages <= limit; alloc() grants only while it holds
        self._on_met: Callable[[], None] | None = None
        self._on_evict = on_evict
        self._num_pages_mapped_total = 0
        self._num_pages_unmapped_total = 0
        self._thread_error: BaseException | None = None
        self._closed = False
        self._thread: ReserveThread | None = None
        pinned = self._alloc.claim_unmapped(-(-num_pinned_blocks // blocks_per_page))
        if pinned and not self._map(pinned):
            raise MemoryError(f"cannot map the pinned page group ({self.group_bytes} bytes)")
        if limit_bytes is not None:
            self.set_limit_bytes(limit_bytes)
        self.maintain()
        if start_thread:
            self._thread = ReserveThread(self, self._wake, self._config)
            self._thread.start()

    # -- the limit ---------------------------------------------------------------------

    def set_limit_bytes(self, limit_bytes: int | None, on_met: Callable[[], None] | None = None) -> bool:
        """Set the physical limit (None: none) and apply it now.

        Lowering it unmaps empty page groups, then evicts the cached blocks of pages
        with no used block and unmaps those; while live blocks keep the pool over the
        limit, ``alloc()`` returns None and :meth:`maintain` keeps returning pages as
        they empty. Nothing is ever mapped beyond the limit. The pinned page group
        always stays, so a limit under one page group is never met.

        Args:
            on_met: called once, without the lock, when the limit is met (perhaps before
                this returns); replaces a pending one.

        Returns:
            Whether the limit is met now.

        Raises:
            ValueError: a negative or non-integer limit; nothing changed.
        """
        if limit_bytes is not None:
            limit_bytes = _nonneg(limit_bytes, "limit_bytes")
        with self._lock:
            self._limit_bytes = limit_bytes
            limit_pages = self.num_pages if limit_bytes is None else limit_bytes // self.group_bytes
            self._limit_pages = min(limit_pages, self.num_pages)
            self._on_met = on_met
            pages = self._claim_over_limit_locked()
            self._refresh_limit_locked()
        if pages:
            self._unmap(pages)
        self._fire_met()
        return self._limit_met

    @property
    def limit_met(self) -> bool:
        """Whether the pool holds no more physical memory than its limit."""
        return self._limit_met

    @property
    def limit_bytes(self) -> int | None:
        return self._limit_bytes

    def trim_reserve(self) -> int:
        """Unmap every empty page group now; return how many. The reserve refills as usual
        later (another engine under pressure can have the memory meanwhile)."""
        with self._lock:
            pages = self._alloc.claim_empty(self._alloc.num_empty_pages)
            self._refresh_limit_locked()
        if pages:
            self._unmap(pages)
        self._fire_met()
        return len(pages)

    # -- maintenance -------------------------------------------------------------------

    def maintain(self, now: float | None = None) -> bool:
        """One round of background work: size the reserve from the draw rate, map or
        trim empty page groups, apply the limit. The reserve thread calls it.

        Returns:
            Whether the pool is busy (allocations lately, or work done now): the
            thread comes back sooner then.
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
        while True:  # map in batches, publishing each so alloc() can use it at once
            with self._lock:
                want = plan.target_pages - a.num_empty_pages - a.num_mapping_pages
                room = min(self._limit_pages - a.num_held_pages, a.num_unmapped_pages)
                if self._closed or want <= 0 or room <= 0:
                    if want > 0:  # the limit or the capacity stops the reserve: stop asking per draw
                        self._reserve_target = a.num_empty_pages + a.num_mapping_pages
                    break
                pages = a.claim_unmapped(min(want, room, self._config.map_batch_pages))
                self._refresh_limit_locked()
            if not self._map(pages):
                with self._lock:  # memory refused: the same, until the next round
                    self._reserve_target = a.num_empty_pages + a.num_mapping_pages
                break
            busy = True
        self._fire_met()
        return busy or not plan.idle

    # -- checks and life cycle -----------------------------------------------------------

    def check_integrity(self) -> None:
        """Verify the bookkeeping and, when no map/unmap is in flight, that it agrees with
        the mapper's ``mapped_bytes``. Raises :class:`PoolIntegrityError`, or
        :class:`PoolError` if the reserve thread failed."""
        with self._lock:
            self._raise_if_unusable(closed_ok=True)
            a = self._alloc
            a.check_integrity()
            if a.num_mapping_pages == a.num_unmapping_pages == 0 and not self._closed:
                mapped = a.num_mapped_pages * self.group_bytes
                if self._mapper.mapped_bytes != mapped:
                    raise PoolIntegrityError(
                        f"the mapper maps {self._mapper.mapped_bytes} bytes, the pool counts {mapped}"
                    )
                blocks = a.num_used + a.num_cached + a.num_free + a.num_pinned_blocks
                if blocks * self.block_bytes != mapped:
                    raise PoolIntegrityError(f"{blocks} blocks accounted on {a.num_mapped_pages} mapped pages")
            if not self._closed and self._limit_met != (a.num_held_pages <= self._limit_pages):
                raise PoolIntegrityError("stale limit_met")

    def close(self) -> None:
        """Stop the reserve thread; ``alloc()`` raises from now on. Idempotent. Subclasses
        release the memory (the mapper is not touched here)."""
        with self._lock:
            self._closed = True
            self._limit_met = False  # sends alloc() to its slow path, which raises
        if self._thread is not None:
            self._thread.stop()

    def __enter__(self) -> PageKeeper:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- internals -----------------------------------------------------------------------

    def _evict_locked(self, num_blocks: int) -> list[int]:
        victims = self._alloc.evict(num_blocks)
        if victims and self._on_evict is not None:
            self._on_evict(victims)
        return victims

    def _claim_over_limit_locked(self) -> list[int]:
        """Claim empty pages to unmap until under the limit, evicting cache-only pages if need be."""
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
        """Map claimed pages (outside the lock) and publish them; False if memory was refused."""
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
        """Unmap claimed pages (outside the lock) and retire them."""
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
