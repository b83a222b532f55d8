"""SGLang token-to-KV allocators that draw SGLang pages from kvcached (SGLang 0.5.17 and
0.5.23: the methods overridden here have the same contract in both).

The allocator keeps no free list of its own: every SGLang page it hands out is a
kvcached block taken from the pool (mapping page groups on demand), and every page freed
goes straight back (its page group is unmapped once empty and idle). SGLang's own
extend/decode index kernels still run, fed exactly the pages they will consume.

``available_size()`` is what can be allocated *now* (free mapped blocks plus what the
limit and the device still allow), so SGLang admits requests against real memory;
:meth:`ElasticAllocatorMixin.index_free_tokens` is the slot-space truth (capacity minus
slots held) that SGLang's leak check compares against.

Binding to the pool's store registers the engine in the control plane: a pool with an
allocator is a live engine (a pool SGLang builds and then refuses never registers).
"""

from __future__ import annotations

from typing import Any

import torch
from sglang.srt.mem_cache.allocator.paged import PagedTokenToKVPoolAllocator
from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
from sglang.srt.utils import get_num_new_pages

from kvcached.integrations.sglang.elastic import ElasticKV, elastic_store_of

__all__ = ["ElasticAllocatorMixin", "ElasticPagedTokenToKVPoolAllocator", "ElasticTokenToKVPoolAllocator"]


class ElasticAllocatorMixin:
    """Page traffic between an SGLang allocator and its pool's :class:`ElasticKV`."""

    size: int
    page_size: int
    device: Any
    _kvcache: Any
    free_pages: Any
    _store: ElasticKV
    _in_use: torch.Tensor
    _num_in_use: int
    _held_out: list[int]

    def _bind(self) -> None:
        store = elastic_store_of(self._kvcache)
        if store is None:
            raise TypeError(
                f"kvcached: {type(self).__name__} needs a kvcached KV pool, got {type(self._kvcache).__name__}"
            )
        self._store = store
        self._in_use = torch.zeros(self.size // self.page_size + 1, dtype=torch.bool)
        self._num_in_use = 0
        self._held_out = []
        store.register()

    @property
    def num_pages_in_use(self) -> int:
        """SGLang pages handed out and not yet freed."""
        return self._num_in_use

    def index_free_tokens(self) -> int:
        """Slots not held by anyone: the capacity SGLang's leak check accounts for."""
        return (self.size // self.page_size - self._num_in_use) * self.page_size

    @property
    def slots_per_group(self) -> int:
        """Token slots on one kvcached page group."""
        return self.page_size * self._store.pool.blocks_per_page

    def held_blocks_per_group(self) -> torch.Tensor:
        """SGLang pages held, per kvcached page group (index: group id; CPU int64)."""
        per_group = self._store.pool.blocks_per_page
        held = self._in_use.to(torch.int64)
        pad = -held.numel() % per_group
        if pad:
            held = torch.cat((held, held.new_zeros(pad)))
        return held.view(-1, per_group).sum(dim=1)

    def available_size(self) -> int:
        blocks = self._store.allocatable_blocks() - len(self._held_out)
        return max(0, min(blocks * self.page_size, self.index_free_tokens()))

    def merge_and_sort_free(self) -> None:
        """Nothing is kept locally: the pool orders pages (fullest mapped page first)."""

    def _take_pages(self, num_pages: int) -> torch.Tensor | None:
        """``num_pages`` page ids from the pool as an int64 tensor, or None (nothing taken)."""
        if num_pages <= 0:
            return torch.empty((0,), dtype=torch.int64, device=self.device)
        pool, last = self._store.pool, self._store.max_block_id
        ids = pool.alloc(num_pages)
        if ids is None:
            return None
        while max(ids) > last:  # blocks past SGLang's last page: park them, ask again
            good = [i for i in ids if i <= last]
            self._held_out += [i for i in ids if i > last]
            more = pool.alloc(num_pages - len(good))
            if more is None:
                if good:
                    pool.free(good)
                return None
            ids = good + more
        pages = torch.tensor(ids, dtype=torch.int64)
        self._in_use[pages] = True
        self._num_in_use += len(ids)
        return pages.to(self.device)

    def _give_pages(self, page_ids: torch.Tensor) -> None:
        """Return page ids to the pool. ValueError (from the pool) on a double free."""
        if page_ids.numel() == 0:
            return
        pages = page_ids.to("cpu", torch.int64)
        ids = pages.tolist()
        self._store.pool.free(ids)
        self._in_use[pages] = False
        self._num_in_use -= len(ids)

    def _return_everything(self) -> None:
        if getattr(self, "_store", None) is None:
            return
        held = torch.nonzero(self._in_use).flatten()
        self._give_pages(held)
        if self._held_out:
            self._store.pool.free(self._held_out)
            self._held_out = []


class ElasticTokenToKVPoolAllocator(ElasticAllocatorMixin, TokenToKVPoolAllocator):
    """``TokenToKVPoolAllocator`` (page size 1) over kvcached. Frees between
    ``free_group_begin`` and ``free_group_end`` are held here and returned at the end
    (SGLang's own bookkeeping of such groups differs between versions; this is the same)."""

    _deferred_frees: list[torch.Tensor] | None = None

    def __init__(self, size: int, dtype: torch.dtype, device: str, kvcache: Any, need_sort: bool) -> None:
        self._kvcache = kvcache
        self.size, self.page_size = size, 1
        self._bind()
        super().__init__(size, dtype, device, kvcache, need_sort)

    def clear(self) -> None:
        self._return_everything()
        self._deferred_frees = None
        self.free_pages = torch.empty((0,), dtype=torch.int64, device=self.device)
        self.release_pages = torch.empty((0,), dtype=torch.int64, device=self.device)

    def alloc(self, need_size: int) -> torch.Tensor | None:
        return self._take_pages(need_size)

    def free(self, free_index: torch.Tensor) -> None:
        if free_index.numel() == 0:
            return
        if self._deferred_frees is not None:
            self._deferred_frees.append(free_index.clone())  # the caller may reuse its tensor
        else:
            self._give_pages(free_index)

    def free_group_begin(self) -> None:
        self._deferred_frees = []

    def free_group_end(self) -> None:
        group, self._deferred_frees = self._deferred_frees, None
        if group:
            self.free(torch.cat(group))


class ElasticPagedTokenToKVPoolAllocator(ElasticAllocatorMixin, PagedTokenToKVPoolAllocator):
    """``PagedTokenToKVPoolAllocator`` over kvcached."""

    def __init__(
        self, size: int, page_size: int, dtype: torch.dtype, device: str, kvcache: Any, need_sort: bool
    ) -> None:
        self._kvcache = kvcache
        self.size, self.page_size = size, page_size
        self._bind()
        super().__init__(size, page_size, dtype, device, kvcache, need_sort)

    def clear(self) -> None:
        self._return_everything()
        super().clear()
        self.free_pages = torch.empty((0,), dtype=torch.int64, device=self.device)

    def get_all_free_pages(self) -> torch.Tensor:
        return self.free_pages

    def alloc(self, need_size: int) -> torch.Tensor | None:
        pages = self._take_pages(need_size // self.page_size)
        if pages is None:
            return None
        offsets = torch.arange(self.page_size, device=self.device)
        return (pages[:, None] * self.page_size + offsets).reshape(-1)

    def alloc_extend(
        self,
        prefix_lens: torch.Tensor,
        prefix_lens_cpu: torch.Tensor,
        seq_lens: torch.Tensor,
        seq_lens_cpu: torch.Tensor,
        last_loc: torch.Tensor,
        extend_num_tokens: int,
        num_new_pages: int | None = None,
    ) -> torch.Tensor | None:
        if num_new_pages is None:
            num_new_pages = int(
                get_num_new_pages(seq_lens=seq_lens_cpu, page_size=self.page_size, prefix_lens=prefix_lens_cpu)
            )
        return self._with_pages(
            num_new_pages,
            super().alloc_extend,
            prefix_lens,
            prefix_lens_cpu,
            seq_lens,
            seq_lens_cpu,
            last_loc,
            extend_num_tokens,
            num_new_pages,
        )

    def alloc_decode(
        self, seq_lens: torch.Tensor, seq_lens_cpu: torch.Tensor, last_loc: torch.Tensor
    ) -> torch.Tensor | None:
        num_new_pages = int(get_num_new_pages(seq_lens=seq_lens_cpu, page_size=self.page_size, decode=True))
        return self._with_pages(num_new_pages, super().alloc_decode, seq_lens, seq_lens_cpu, last_loc)

    def _with_pages(self, num_new_pages: int, kernel: Any, *args: Any) -> torch.Tensor | None:
        """Run SGLang's index kernel over exactly the pages it will consume."""
        pages = self._take_pages(num_new_pages)
        if pages is None:
            return None
        self.free_pages = pages
        try:
            out = kernel(*args)
        finally:
            leftover, self.free_pages = self.free_pages, self.free_pages[:0]
        if out is None:
            self._give_pages(pages)
        elif leftover.numel():
            self._give_pages(leftover)
        return out

    def _release_page_ids(self, *page_ids: torch.Tensor) -> None:
        for ids in page_ids:
            self._give_pages(ids)
