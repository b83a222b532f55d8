"""Which free blocks the scheduler should get instead of vLLM's next ones: packing.

vLLM's free queue hands out never-used blocks before freed (cached) ones, so over a
virtual KV cache an engine would map its whole limit before it reused anything, and
scatter its live blocks over every page group it touched. On a GPU shared under a budget
(or with ``pack="on"``), before a new page group is started — mapped, or the empty one
the prefetch mapped ahead — the block pool moves these to the head of vLLM's queue: free
blocks on groups in use (lowest group first), then cached ones while the prefix cache
holds more than ``idle_cache_bytes``. What an engine maps then follows what it uses, and
groups empty as requests finish. With the budget full, blocks already on mapped groups
are the only ones that can be handed out at all (:func:`free_blocks_on_mapped_pages`).

While packing, each request's new blocks also go next to its own (:func:`blocks_near`):
to the page group of its last block while that has room, else to the lowest group with
room for all of them. Without it, a request admitted into a full cache takes whatever
blocks were freed longest ago, one per group, and after a peak the last few requests hold
a dozen groups with a few blocks each; kept together, their groups empty when they finish.

Packing picks cached blocks by group, not in vLLM's least-recently-used order, so it never
takes one a prefix hit reused (``VllmPages.reused``): shared prompts stay cached while the
one-off tails and generated tokens, most of the cache, are reused in place.

Functions of a :class:`~kvcached.integrations.vllm.pages.VllmPages`, read under its lock;
they only choose block ids and change nothing.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from kvcached.integrations.vllm.states import CACHED, FREE, MAPPED

if TYPE_CHECKING:
    from kvcached.integrations.vllm.pages import VllmPages

__all__ = ["blocks_near", "blocks_to_pack", "free_blocks_on_mapped_pages", "opens_page", "packs"]

_FREE, _CACHED = bytes([FREE]), bytes([CACHED])


def packs(pages: VllmPages) -> bool:
    """Whether blocks on mapped page groups go before a new group is mapped: with
    ``pack="auto"``, while the GPU has a budget (engines share it)."""
    if pages.pack != "auto":
        return pages.pack == "on"
    return pages.budget_room is not None and pages.budget_room() is not None


def opens_page(pages: VllmPages, block_ids: Iterable[int]) -> bool:
    """Whether handing out ``block_ids`` starts a page group: one not mapped, or mapped
    but holding no block (the reserve the prefetch mapped ahead)."""
    bpp, page, held = pages.blocks_per_page, pages.page_state, pages.held
    return any(page[b // bpp] != MAPPED or held[b // bpp] == 0 for b in block_ids)


def blocks_to_pack(pages: VllmPages, n: int, include_empty: bool = True) -> list[int]:
    """Up to ``n`` blocks to hand out instead of starting a new page group, lowest group
    first: free blocks on groups that hold others, then cached blocks beyond
    ``idle_cache_bytes`` of prefix cache (none when that is None), then (with
    ``include_empty``) the blocks of empty mapped groups, which stay trimmable as long
    as possible."""
    excess = _spare_cached(pages)
    if pages.num_blocks_on_mapped_pages() - pages.num_cached <= 0 and excess == 0:
        return []
    free, cached, empty = _blocks_on_mapped_pages(pages, n, excess, empty_is_free=False, keep_reused=True)
    return (free + cached + (empty if include_empty else []))[:n]


def blocks_near(pages: VllmPages, n: int, near: int | None) -> list[int]:
    """Up to ``n`` blocks for one request on mapped page groups that hold other blocks:
    first on the group of ``near`` (the request's last block; None for a new request),
    then on the lowest group with room for all that remain, else the roomiest ones. Free
    blocks first, then cached ones beyond ``idle_cache_bytes`` of prefix cache. Empty
    groups are left to :func:`blocks_to_pack` (they stay trimmable). Fewer than ``n``
    (or none) when the groups in use are full.

    On the scheduler's path (every new block while packing): a decode block next to its
    request's costs two ``bytearray.find`` calls; only a new request, or one whose group
    is full, walks the groups."""
    bpp, num_blocks, num_pages = pages.blocks_per_page, pages.num_blocks, pages.num_pages
    page, state, held, cached_on = pages.page_state, pages.block_state, pages.held, pages.cached_on
    spare_cached = _spare_cached(pages)
    if pages.num_blocks_on_held_pages() - pages.num_cached + spare_cached <= 0:
        return []  # every group in use is full (the common case at a peak)
    last_page, tail = num_pages - 1, num_pages * bpp - num_blocks
    reused = pages.reused
    out: list[int] = []
    tried: set[int] = set()

    def take(p: int) -> None:
        nonlocal spare_cached
        tried.add(p)
        lo, hi = p * bpp, min((p + 1) * bpp, num_blocks)
        out.extend(_ids_in(state, _FREE, lo, hi, n - len(out)))
        if len(out) < n and spare_cached and cached_on[p]:
            cached = _evictable(state, reused, lo, hi)[: min(n - len(out), spare_cached)]
            spare_cached -= len(cached)
            out.extend(cached)

    if near is not None:
        p = near // bpp
        if page[p] == MAPPED:
            take(p)
    if len(out) == n:
        return out
    # One pass over the groups for their room (cached blocks counted up to the spare).
    rooms = [
        (p, bpp - h + (c if c < spare_cached else spare_cached) - (tail if p == last_page else 0))
        for p, (mapping, h, c) in enumerate(zip(page, held, cached_on, strict=True))
        if mapping == MAPPED and h and p not in tried
    ]
    need = n - len(out)
    fits = next((p for p, r in rooms if r >= need), None)
    for p in [fits] if fits is not None else [p for p, r in sorted(rooms, key=lambda pr: -pr[1]) if r > 0]:
        take(p)
        if len(out) == n:
            break
    return out


def free_blocks_on_mapped_pages(pages: VllmPages, n: int) -> list[int]:
    """Up to ``n`` block ids that need no mapping: free blocks on mapped page groups
    first, then cached ones (handing those out evicts their prefix-cache entry)."""
    free, cached, empty = _blocks_on_mapped_pages(pages, n, pages.num_blocks, empty_is_free=True, keep_reused=False)
    return (sorted(free + empty) + cached)[:n]  # ids ascend with the page: lowest group first


def _blocks_on_mapped_pages(
    pages: VllmPages, n: int, max_cached: int, empty_is_free: bool, keep_reused: bool
) -> tuple[list[int], list[int], list[int]]:
    """Blocks of mapped page groups not full of used blocks, lowest group first: free
    ones on groups that hold others, at most ``max_cached`` cached ones (none a prefix hit
    reused, with ``keep_reused``), and the blocks of groups holding none (whole groups,
    until there are ``n``). The scan stops once there are ``n`` free blocks (counting
    those of empty groups if ``empty_is_free``)."""
    bpp, num_blocks = pages.blocks_per_page, pages.num_blocks
    page, state, held, cached_on, reused = pages.page_state, pages.block_state, pages.held, pages.cached_on, pages.reused
    free: list[int] = []
    cached: list[int] = []
    empty: list[int] = []
    for p, (mapping, h, c) in enumerate(zip(page, held, cached_on, strict=True)):
        if mapping != MAPPED or h - c == bpp:
            continue
        lo, hi = p * bpp, min((p + 1) * bpp, num_blocks)
        if h == 0:
            if len(empty) < n:
                empty.extend(range(lo, hi))
        else:
            free.extend(_ids_in(state, _FREE, lo, hi, bpp))
            if c and len(cached) < max_cached:
                ids = _evictable(state, reused, lo, hi) if keep_reused else _ids_in(state, _CACHED, lo, hi, bpp)
                cached.extend(ids[: max_cached - len(cached)])
        if len(free) + (len(empty) if empty_is_free else 0) >= n:
            break
    return free, cached, empty


def _spare_cached(pages: VllmPages) -> int:
    """Cached blocks beyond ``idle_cache_bytes`` of prefix cache: what packing may evict."""
    if pages.idle_cache_bytes is None:
        return 0
    return max(0, pages.num_cached - pages.idle_cache_bytes // pages.block_bytes)


def _evictable(state: bytearray, reused: bytearray, lo: int, hi: int) -> list[int]:
    """Cached block ids in ``[lo, hi)`` that no prefix hit reused (packing keeps those)."""
    return [b for b in _ids_in(state, _CACHED, lo, hi, hi - lo) if not reused[b]]


def _ids_in(state: bytearray, byte: bytes, lo: int, hi: int, limit: int) -> list[int]:
    """Up to ``limit`` block ids in ``[lo, hi)`` whose state is ``byte``, ascending (the
    scan is ``bytearray.find``'s, in C: this runs on the scheduler's path)."""
    out: list[int] = []
    i = state.find(byte, lo, hi) if limit > 0 else -1
    while i >= 0:
        out.append(i)
        if len(out) == limit:
            break
        i = state.find(byte, i + 1, hi)
    return out
