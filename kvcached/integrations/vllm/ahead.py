"""How far ahead of vLLM's allocations the prefetch thread maps, and which page groups.

The scheduler takes blocks from the head of vLLM's free queue; :class:`Ahead` picks the
page groups of the next blocks (the next block's group and ``max(1, reserve_pages)`` after
it) so the thread maps them before a request crosses into them. The depth adapts: each
time the scheduler had to map a group itself (a burst of admissions outran the thread —
at 100 req/s on the 8B a step can need ~8 groups) it doubles, up to ``MAX_BYTES`` or
``MAX_PAGES``; after ``DECAY_S`` without that it halves back towards the base, and the
idle trim returns what a burst left mapped ahead.

Pure bookkeeping: :class:`~kvcached.integrations.vllm.pages.VllmPages` owns the page
states and the thread, and calls this under its lock.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["Ahead"]

MAX_PAGES, MAX_BYTES, DECAY_S = 16, 1 << 30, 0.5


class Ahead:
    """The page groups wanted ahead and the current depth.

    Args:
        reserve_pages: empty page groups the reserve keeps mapped (the base depth is
            this plus the next block's group, at least 2).
        group_bytes: bytes of one page group (caps the depth at ``MAX_BYTES``).
    """

    def __init__(self, reserve_pages: int, group_bytes: int) -> None:
        self.base = 1 + max(1, reserve_pages)
        self.max = max(self.base, min(MAX_PAGES, MAX_BYTES // max(1, group_bytes)))
        self.want = self.base
        self.raised = 0.0  # when the depth last grew (or last halved)
        self.stale = False  # the depth grew since the pages were picked
        self.pages: list[int] = []

    def pick(self, upcoming_block_ids: Iterable[int], blocks_per_page: int) -> list[int]:
        """The distinct groups of the next blocks (read lazily, in the order vLLM hands
        them out), ``want`` of them at most; they become :attr:`pages`."""
        pages: list[int] = []
        for i, b in enumerate(upcoming_block_ids):
            p = b // blocks_per_page
            if p not in pages:
                pages.append(p)
                if len(pages) >= self.want:
                    break
            if i >= self.want * blocks_per_page:  # a queue of scattered blocks: enough looked at
                break
        self.pages, self.stale = pages, False
        return pages

    def fell_behind(self, now: float) -> None:
        """The scheduler had to map a group itself: look twice as far ahead."""
        if self.want < self.max:
            self.want = min(self.max, 2 * self.want)
            self.stale = True
        self.raised = now

    def decay(self, now: float) -> None:
        """Halve the depth towards the base once ``DECAY_S`` passed without falling behind."""
        if self.want > self.base and now - self.raised >= DECAY_S:
            self.want = max(self.base, self.want // 2)
            self.raised = now
