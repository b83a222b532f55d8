"""``ElasticBlockPool``: vLLM's block pool with physical memory only under live blocks.

A subclass of the engine's own ``BlockPool`` (``super().__init__`` keeps ``blocks``,
the free queue, the prefix-cache maps and the null block exactly as vLLM builds them),
so vLLM still chooses every block id (on a GPU shared under a budget, free and surplus
cached blocks on mapped pages are moved to the head of its queue first: packing);
:class:`~kvcached.integrations.vllm.pages.VllmPages` maps the page group under a block
before vLLM hands it out and returns page groups whose blocks are all free.

Capacity is reported through ``get_num_free_blocks()``: vLLM's count, capped by what the
limit (and the GPU budget) lets us map. ``KVCacheManager.allocate_slots`` compares it
with what a request needs and answers ``None`` — the request waits — instead of calling
``get_new_blocks`` beyond it, so pressure is never an exception in the engine. vLLM's
usage gauge (``kv_cache_usage_perc``) derives from the same count, so it reads how much of
its cache the engine cannot take now: its own requests' blocks, and under a limit or a
GPU budget what those leave it no room for (what a router or autoscaler needs to know).
``reset_prefix_cache`` alone checks "all blocks free" against vLLM's uncapped count.

Imported only after ``vllm.v1.core.block_pool`` exists (by the post-import hook).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from vllm.v1.core.block_pool import BlockPool

from kvcached import envs
from kvcached.integrations.vllm import compaction, placement, runtime
from kvcached.integrations.vllm.pages import CACHED, FREE, USED, VllmPages

__all__ = ["ElasticBlockPool"]


class ElasticBlockPool(BlockPool):
    """vLLM's ``BlockPool`` over on-demand mapped memory; same constructor, same methods."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.kv: VllmPages = runtime.make_pages(self.num_gpu_blocks, evict_cached=self._evict_cached)
        self.kv_lock = self.kv.lock
        self._head_page: int | None = -1  # page of the free queue's head when last prefetched for
        # Set by the patched ``KVCacheManager.allocate_slots``: the request being allocated
        # for, and where its blocks are listed. While packing, new ones go next to them.
        self.allocating_for: str | None = None
        self.req_to_blocks: Mapping[str, list[Any]] | None = None
        self.compactor = compaction.Compactor()  # blocks moved together between steps

    # -- capacity -------------------------------------------------------------------

    def get_num_free_blocks(self) -> int:
        free = super().get_num_free_blocks()
        usable = self.kv.usable_blocks()
        return free if free < usable else usable

    # -- blocks changing hands ------------------------------------------------------------

    def get_new_blocks(self, num_blocks: int) -> list[Any]:
        with self.kv_lock:
            if num_blocks > self.get_num_free_blocks():
                raise ValueError(f"Cannot get {num_blocks} free blocks from the pool")
            if placement.packs(self.kv):
                self._place_near_request(num_blocks)
            self._map_upcoming(num_blocks)
            blocks = super().get_new_blocks(num_blocks)
            kv = self.kv
            kv.set_states((b.block_id for b in blocks), USED)
            reused = kv.reused
            for b in blocks:
                reused[b.block_id] = 0  # new contents: no prefix has been hit on it yet
            head = self.free_block_queue.fake_free_list_head.next_free_block
            head_page = None if head is None or head.block_id < 0 else head.block_id // kv.blocks_per_page
            # The pages ahead change when the head's page does, or when idle trimming took one.
            if head_page != self._head_page or not kv.ahead_mapped():
                self._head_page = head_page
                kv.want_prefetch(b.block_id for b in self._free_queue())
            return blocks

    def _place_near_request(self, num_blocks: int) -> None:
        """Move blocks next to the requesting request's own to the head of the queue
        (:func:`~kvcached.integrations.vllm.placement.blocks_near`)."""
        held = (self.req_to_blocks or {}).get(self.allocating_for or "")
        near = held[-1].block_id if held else None
        ids = placement.blocks_near(self.kv, num_blocks, near)
        if ids:
            self._to_front([self.blocks[i] for i in ids])

    def _map_upcoming(self, num_blocks: int) -> None:
        """Make the next ``num_blocks`` of vLLM's free queue sit on mapped pages.

        On a shared GPU blocks on mapped pages go first (packing, see
        :mod:`~kvcached.integrations.vllm.placement`). Then the pages still
        needed are mapped if the limit and the budget allow; otherwise any free block on
        a mapped page moves to the head of the queue. If the device or the budget still
        refuses (another engine took the room since the capacity check), wait for
        memory, with the lock released, up to ``KVCACHED_MAP_WAIT_S``.
        """
        kv, deadline = self.kv, None
        while True:
            upcoming = [b.block_id for b in self._peek(num_blocks)]
            if not placement.opens_page(kv, upcoming):
                return  # the common case: all on page groups already in use
            pages = kv.pages_of(upcoming)
            if placement.packs(kv):
                # A page group's worth at a time: the next allocations find theirs at the head.
                # The empty reserve counts as reusable only where the head would need a map.
                packed = placement.blocks_to_pack(kv, max(num_blocks, kv.blocks_per_page), include_empty=bool(pages))
                if packed:
                    self._to_front([self.blocks[i] for i in packed])
                    pages = kv.pages_of(b.block_id for b in self._peek(num_blocks))
            if not pages or kv.ensure_mapped(pages):
                return
            on_mapped = placement.free_blocks_on_mapped_pages(kv, num_blocks)
            self._to_front([self.blocks[i] for i in on_mapped])
            pages = kv.pages_of(b.block_id for b in self._peek(num_blocks))
            if not pages or kv.ensure_mapped(pages):
                return
            now = time.monotonic()
            if deadline is None:
                deadline = now + envs.get("KVCACHED_MAP_WAIT_S")
            elif now >= deadline:
                raise MemoryError(
                    f"kvcached: no memory for {num_blocks} KV blocks after {envs.get('KVCACHED_MAP_WAIT_S'):g} s "
                    f"(limit {kv.limit_bytes}, GPU budget or device full)"
                )
            kv.wait(0.005)

    def touch(self, blocks: Sequence[Any]) -> None:
        # vLLM touches the blocks a new request found in the prefix cache: they are reused.
        with self.kv_lock:
            super().touch(blocks)
            reused = self.kv.reused
            for block_id in self._resync(blocks)[USED]:  # touched: all in use now
                reused[block_id] = 1

    def free_blocks(self, ordered_blocks: Iterable[Any], *args: Any, **kwargs: Any) -> None:
        # 0.34 added ``evict_first`` (and forwards it to the pool a block belongs to).
        with self.kv_lock:
            blocks = list(ordered_blocks)
            super().free_blocks(blocks, *args, **kwargs)
            self._resync(blocks)
            if not self.kv.limit_met:
                self.kv.enforce_soon()  # off the scheduler's path: the unmap waits for no step

    def evict_blocks(self, block_ids: set[int]) -> None:
        with self.kv_lock:
            super().evict_blocks(block_ids)
            self._resync(self.blocks[i] for i in block_ids)

    def reset_prefix_cache(self) -> bool:
        # vLLM refuses unless every block but the null one is free by *its* count; ours is
        # capped by the limit and the budget, so it would refuse on every limited engine.
        # Under the lock no scheduler step runs, so vLLM's count may stand in meanwhile.
        with self.kv_lock:
            self.get_num_free_blocks = super().get_num_free_blocks  # type: ignore[method-assign]
            try:
                ok = super().reset_prefix_cache()
            finally:
                del self.get_num_free_blocks
            if ok:
                self._resync(self.blocks)
            return ok

    # Everything else that reads or writes the prefix-cache maps runs under the lock,
    # so an eviction for a limit (from the control thread) never interleaves with it.

    def get_cached_block(self, *args: Any, **kwargs: Any) -> Any:
        with self.kv_lock:
            return super().get_cached_block(*args, **kwargs)

    def cache_full_blocks(self, *args: Any, **kwargs: Any) -> None:
        with self.kv_lock:
            super().cache_full_blocks(*args, **kwargs)

    def unpin_blocks(self, blocks: Iterable[Any], *args: Any, **kwargs: Any) -> None:
        with self.kv_lock:
            blocks = list(blocks)
            super().unpin_blocks(blocks, *args, **kwargs)
            self._resync(blocks)

    # -- helpers ------------------------------------------------------------------------

    def _peek(self, n: int) -> list[Any]:
        """The first ``n`` blocks of vLLM's free queue: the ones it will hand out next."""
        return list(itertools.islice(self._free_queue(), n))

    def _free_queue(self) -> Iterator[Any]:
        """vLLM's free queue from its head, lazily."""
        queue = self.free_block_queue
        tail = queue.fake_free_list_tail
        block = queue.fake_free_list_head.next_free_block
        while block is not None and block is not tail:
            yield block
            block = block.next_free_block

    def _to_front(self, blocks: list[Any]) -> None:
        """Move free ``blocks`` to the head of vLLM's free queue, in the given order."""
        queue = self.free_block_queue
        head = queue.fake_free_list_head
        for block in reversed(blocks):
            queue.remove(block)
            first = head.next_free_block
            block.prev_free_block, block.next_free_block = head, first
            head.next_free_block = block
            first.prev_free_block = block
            queue.num_free_blocks += 1

    def _state_of(self, block: Any) -> int:
        if block.ref_cnt > 0:
            return USED
        if block.block_hash is not None or block.block_id in getattr(self, "_reuse_watchers", ()):
            return CACHED
        return FREE

    def _resync(self, blocks: Iterable[Any]) -> dict[int, list[int]]:
        """Record the states of ``blocks`` (this pool's, not the null block); their ids by state."""
        # One set_states call per state, not per block: free_blocks is on the scheduler's path.
        by_state: dict[int, list[int]] = {FREE: [], USED: [], CACHED: []}
        pool_blocks, num = self.blocks, self.num_gpu_blocks
        for block in blocks:
            block_id = block.block_id
            if block.is_null or block_id >= num or pool_blocks[block_id] is not block:
                continue  # the null block, or a block of another pool
            by_state[self._state_of(block)].append(block_id)
        for state, ids in by_state.items():
            if ids:
                self.kv.set_states(ids, state)
        return by_state

    def _evict_cached(self, block_ids: list[int]) -> None:
        # Called by VllmPages under kv_lock when a limit needs these blocks' pages.
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_cnt == 0:
                self._maybe_evict_cached_block(block)
                getattr(self, "_reuse_watchers", {}).pop(block_id, None)
        self._resync(self.blocks[i] for i in block_ids)
