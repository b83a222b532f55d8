"""The background work of a vLLM engine's pages: map ahead, give back what is idle.

Each round (:func:`maintain`, every tick of at most 50 ms or when the block pool asks for
pages ahead) maps the page groups the scheduler will take next (outside the lock, on
groups marked ``MAPPING``); evicts cold prefix cache beyond ``idle_cache_bytes`` and unmaps
the groups that frees at once (``COLD_GRACE_S`` after they went cold), busy or idle, so
memory returns after a peak while the engine still serves; and unmaps page groups empty
for ``trim_idle_s``, keeping the reserve (the first of the pages ahead, so the next
request after a pause finds its page mapped).
A limit lowered from the control plane gives page groups back the same way, at once
(:func:`enforce_limit`), and again in the next round whenever blocks are freed while it is
unmet; so does a peer's pressure (``VllmPages.trim_reserve``). Every
unmap runs outside the lock, on groups marked ``UNMAPPING``.

Functions of a :class:`~kvcached.integrations.vllm.pages.VllmPages`, which owns the
state and starts the thread.
"""

from __future__ import annotations

import threading
import weakref
from typing import TYPE_CHECKING

from kvcached.integrations.vllm.states import CACHED, MAPPED, MAPPING, UNMAPPED

if TYPE_CHECKING:
    from kvcached.integrations.vllm.pages import VllmPages

__all__ = ["COLD_GRACE_S", "enforce_limit", "evict_cold_pages", "maintain", "run"]

# How long a page group holding only cached blocks waits, beyond the cold-cache bound,
# before its blocks are evicted and it is unmapped (``trim_idle_s`` if shorter). Short:
# the bound already keeps the most recently cold groups, and after a peak every group
# its last requests leave goes cold at once; each wait is on the memory-return path.
COLD_GRACE_S = 0.1


def maintain(pages: VllmPages, now: float) -> None:
    """One round of background work: apply a limit left unmet (``enforce_soon``), map the
    wanted prefetch pages, trim idle ones."""
    if pages._limit_pending:
        with pages.lock:
            pages._limit_pending = False
            going = enforce_limit(pages)
        pages._finish_unmap(going)
    with pages.lock:
        wanted = [p for p in pages._prefetch if pages.page_state[p] == UNMAPPED][: pages.room_pages()]
        pages._prefetch = []
        for p in wanted:
            pages.page_state[p] = MAPPING
    if wanted:
        try:
            pages.mapper.map(wanted)
            ok = True
        except MemoryError:
            ok = False
        with pages.lock:
            if ok:
                pages._record_mapped(wanted, now)
            else:
                for p in wanted:
                    pages.page_state[p] = UNMAPPED
            pages._cond.notify_all()
    with pages.lock:
        pages._ahead.decay(now)
        freed: list[int] = []
        if pages.idle_cache_bytes is not None and len(pages._cold_since) * pages.group_bytes > pages.idle_cache_bytes:
            # Cold cache beyond its bound goes, and the pages that frees go back at once.
            before = set(pages._empty_since)
            evict_cold_pages(pages, pages.idle_cache_bytes, now - min(pages.trim_idle_s, COLD_GRACE_S))
            freed = sorted(p for p in pages._empty_since if p not in before and pages.page_state[p] == MAPPED)
        idle = [p for p, t in pages._empty_since.items() if now - t >= pages.trim_idle_s and p not in freed]
        keep = pages.reserve_pages if len(idle) + len(freed) < len(pages._empty_since) else min(pages.reserve_pages, 1)
        kept_ahead = [p for p in pages._ahead.pages if p in pages._empty_since and p not in freed][:keep]
        idle = sorted((p for p in idle if p not in kept_ahead), key=lambda p: -p)
        idle = idle[: max(0, len(pages._empty_since) - len(freed) - keep)]
        going = pages._begin_unmap(freed + idle)
    # The driver calls run outside the lock: the scheduler's step (which holds it) never
    # waits for an unmap (~2 ms per page group of an 8B on an H200).
    pages._finish_unmap(going)


def enforce_limit(pages: VllmPages) -> list[int]:
    """Under the lock: pick the page groups to unmap until the limit holds — empty ones
    first, then those whose only holders are cached blocks (evicted now) — and mark them
    ``UNMAPPING``. Returns them for :meth:`VllmPages._finish_unmap`, which the caller runs
    once it released the lock. Used blocks are never touched: if they alone exceed the
    limit it stays unmet (``limit_met``) until they are freed."""
    excess = pages._num_mapped - pages._limit_pages
    if excess <= 0:
        return []
    going = pages._begin_unmap(pages._empty_pages(excess, include_reserve=True))
    excess -= len(going)
    if excess > 0 and pages.evict_cached is not None:
        # Pages whose only holders are cached blocks: evict those, then unmap.
        victims = [p for p in range(pages.num_pages) if pages.page_state[p] == MAPPED and p != 0
                   and pages.held[p] and pages.held[p] == pages.cached_on[p]][:excess]
        if victims:
            bpp = pages.blocks_per_page
            ids = [b for p in victims for b in range(p * bpp, min((p + 1) * bpp, pages.num_blocks))
                   if pages.block_state[b] == CACHED]
            pages.evict_cached(ids)
            pages._num_evicted += len(ids)
            going += pages._begin_unmap(pages._empty_pages(excess, include_reserve=True))
    return going


def evict_cold_pages(pages: VllmPages, keep_bytes: int, cold_before: float) -> None:
    """Evict the cached blocks of pages cold since ``cold_before`` or longer (the
    longest-cold first) until the cache-only pages still mapped take at most
    ``keep_bytes``. The bound is on pages, not cached bytes: a few cached blocks
    spread over many pages would otherwise pin whole page groups each."""
    if pages.evict_cached is None:
        return
    cold = sorted(((since, p) for p, since in pages._cold_since.items() if p != 0 and pages.page_state[p] == MAPPED))
    excess = len(cold) - keep_bytes // pages.group_bytes
    bpp, victims = pages.blocks_per_page, list[int]()
    for since, p in cold[: max(0, excess)]:
        if since > cold_before:
            break
        victims.extend(b for b in range(p * bpp, min((p + 1) * bpp, pages.num_blocks)) if pages.block_state[b] == CACHED)
    if victims:
        pages.evict_cached(victims)
        pages._num_evicted += len(victims)


def run(ref: weakref.ref[VllmPages], wake: threading.Event) -> None:
    """The thread: a round of :func:`maintain` when woken or every tick, until the pages close."""
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
