"""What the pool needs from a mapper, and what it reports.

A :class:`PageMapper` gives page groups physical memory. ``kvcached._vmm.Arena`` is
one (the usual case: the pool and the KV tensors live in one process); an engine whose
scheduler and workers are separate processes can pass a mapper that forwards page ids
to its workers' arenas.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Protocol

__all__ = ["PageMapper", "PoolError", "PoolIntegrityError", "PoolStats"]


class PageMapper(Protocol):
    """Maps and unmaps page groups by id. Calls may come from any thread, never two at once."""

    def map(self, page_ids: Sequence[int]) -> None:
        """Back every page group in ``page_ids`` with physical memory, all or nothing.

        Raises:
            MemoryError: physical memory, a budget or a headroom refused (nothing mapped).
            Exception: any other failure (nothing mapped).
        """

    def unmap(self, page_ids: Sequence[int]) -> None:
        """Release the physical memory of every page group in ``page_ids``."""

    @property
    def mapped_bytes(self) -> int:
        """Bytes currently mapped, as the mapper counts them."""
        ...


class PoolError(RuntimeError):
    """The pool cannot go on: its background thread or its mapper failed unexpectedly."""


class PoolIntegrityError(AssertionError):
    """An internal invariant of the pool does not hold: a bug, never a user error."""


class PoolStats(NamedTuple):
    """A consistent snapshot of one pool. Bytes are exact multiples of ``block_bytes``
    (used/cached/free) or ``group_bytes`` (reserve/mapped).

    ``mapped_bytes == (num_blocks_used + num_blocks_cached + num_blocks_free +
    num_blocks_pinned) * block_bytes`` whenever no map or unmap is in flight, and then
    equals the mapper's ``mapped_bytes``.
    """

    used_bytes: int  # blocks handed out and not returned
    cached_bytes: int  # returned blocks kept for prefix hits (evictable)
    free_bytes: int  # free blocks on mapped pages (includes the reserve)
    reserve_bytes: int  # mapped page groups with no used or cached block
    mapped_bytes: int  # page groups mapped or being mapped/unmapped (physical memory held)
    virtual_bytes: int  # capacity: every page group
    limit_bytes: int | None  # the physical limit, None = none
    limit_met: bool  # mapped_bytes <= limit_bytes
    demand_bytes: int  # largest shortfall of a denied allocation in the last second or two
    block_bytes: int
    group_bytes: int
    num_blocks_total: int
    num_blocks_used: int
    num_blocks_cached: int
    num_blocks_free: int
    num_blocks_pinned: int
    num_pages_mapped: int
    num_allocs: int  # successful alloc() calls
    num_frees: int
    num_denied: int  # alloc() calls answered None
    num_sync_maps: int  # alloc() calls that had to map on the caller's thread
    num_evicted: int  # cached blocks evicted
    num_pages_mapped_total: int  # page groups mapped since the start
    num_pages_unmapped_total: int
