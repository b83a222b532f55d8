"""Helpers for the pool tests: a scriptable page mapper and small host-backed pools."""

from __future__ import annotations

from collections.abc import Sequence

from kvcached.pool import KVLayout, KVPool, ReserveConfig

KiB = 1 << 10
MiB = 1 << 20
GRANULARITY = 64 * KiB

# Reserve settings that leave every step to the test (no thread, no surprise trims).
MANUAL = ReserveConfig(min_pages=0, max_pages=4, trim_idle_s=3600.0)


class FakeMapper:
    """A PageMapper that keeps a set of mapped pages, with a page cap (MemoryError beyond
    it) and scripted failures, for fault-injection tests of the pool's bookkeeping."""

    def __init__(self, group_bytes: int, cap_pages: int | None = None) -> None:
        self.group_bytes = group_bytes
        self.cap_pages = cap_pages
        self.mapped: set[int] = set()
        self.fail_map: BaseException | None = None
        self.fail_unmap: BaseException | None = None
        self.calls: list[tuple[str, tuple[int, ...]]] = []

    def map(self, page_ids: Sequence[int]) -> None:
        self.calls.append(("map", tuple(page_ids)))
        if self.fail_map is not None:
            raise self.fail_map
        assert not self.mapped & set(page_ids), f"map of mapped pages {page_ids}"
        if self.cap_pages is not None and len(self.mapped) + len(page_ids) > self.cap_pages:
            raise MemoryError("fake cap")
        self.mapped |= set(page_ids)

    def unmap(self, page_ids: Sequence[int]) -> None:
        self.calls.append(("unmap", tuple(page_ids)))
        if self.fail_unmap is not None:
            raise self.fail_unmap
        assert set(page_ids) <= self.mapped, f"unmap of unmapped pages {page_ids}"
        self.mapped -= set(page_ids)

    @property
    def mapped_bytes(self) -> int:
        return len(self.mapped) * self.group_bytes


def host_backend(cap_bytes: int, granularity: int = GRANULARITY):
    from kvcached import _vmm

    return _vmm.HostBackend(cap_bytes, granularity)


def small_pool(
    layout: KVLayout = KVLayout.VLLM_FLASH,
    *,
    cap_bytes: int = 64 * MiB,
    num_layers: int = 2,
    block_size: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 8,
    page_bytes: int = GRANULARITY,
    virtual_bytes: int = 16 * MiB,
    reserve: ReserveConfig = MANUAL,
    start_thread: bool = False,
    **kwargs: object,
) -> KVPool:
    """A KVPool on a fresh host backend, small enough that OOM and remaps happen fast."""
    import torch

    return KVPool(
        num_layers,
        layout,
        block_size,
        num_kv_heads,
        head_dim,
        kwargs.pop("dtype", torch.float16),  # type: ignore[arg-type]
        backend=host_backend(cap_bytes),
        virtual_bytes=virtual_bytes,
        page_bytes=page_bytes,
        reserve=reserve,
        start_thread=start_thread,
        **kwargs,  # type: ignore[arg-type]
    )


def block_views(pool: KVPool, block: int) -> list:
    """Every tensor slice holding ``block``'s bytes, one or two per layer."""
    bs = pool.geometry.block_size
    if pool.layout in (KVLayout.VLLM_FLASH, KVLayout.COMPOUND):
        return [t[:, block] for t in pool.kv_tensors]
    if pool.layout is KVLayout.SGLANG:
        return [t[:, block * bs : (block + 1) * bs] for t in pool.kv_tensors]
    return [t[block] for t in pool.kv_tensors]


def write_block(pool: KVPool, block: int, value: float) -> None:
    for layer, view in enumerate(block_views(pool, block)):
        view.fill_(value + layer)


def block_holds(pool: KVPool, block: int, value: float) -> bool:
    return all(bool((view == value + layer).all()) for layer, view in enumerate(block_views(pool, block)))
