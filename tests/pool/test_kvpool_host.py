"""KVPool on the host backend: native views, data through unmap/remap, memory that
really returns, and bad input."""

from __future__ import annotations

import time

import psutil
import pytest
import torch
from poolkit import GRANULARITY, MiB, block_holds, block_views, host_backend, write_block

from kvcached.pool import KVLayout, KVPool, ReserveConfig

LAYOUTS = list(KVLayout)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_views_have_native_shapes_strides_and_addresses(make_pool, layout):
    pool = make_pool(layout, num_layers=4, block_size=4, num_kv_heads=2, head_dim=8)
    geo = pool.geometry
    nb, base = pool.num_blocks, pool.arena.base_addr
    assert len(pool.kv_tensors) == 4 and nb == geo.num_blocks
    t = pool.kv_tensors[1]
    assert t.dtype == torch.float16 and t.device.type == "cpu"
    expected_shape = {
        KVLayout.VLLM_FLASH: (2, nb, 4, 2, 8),
        KVLayout.FLASHINFER: (nb, 2, 4, 2, 8),
        KVLayout.MLA: (nb, 4, 16),
        KVLayout.SGLANG: (2, nb * 4, 2, 8),
        KVLayout.COMPOUND: (2, nb, 4, 2, 8),
    }[layout]
    assert tuple(t.shape) == expected_shape
    if layout is KVLayout.COMPOUND:
        assert t.stride() == (64, 4 * 2 * 64, 16, 8, 1)
        assert t.data_ptr() == base + 2 * 64 * 2  # layer 1 starts one layer's K+V into each block
    else:
        assert t.is_contiguous()
        ranges_per_layer = 2 if layout in (KVLayout.VLLM_FLASH, KVLayout.SGLANG) else 1
        assert t.data_ptr() == pool.arena.range_addr(ranges_per_layer) == base + ranges_per_layer * geo.range_bytes
    if layout in (KVLayout.VLLM_FLASH, KVLayout.SGLANG):  # K and V of a layer: adjacent ranges
        assert t[1].data_ptr() == pool.arena.range_addr(3)
    assert pool.block_bytes == geo.block_bytes == pool.arena.group_bytes // pool.blocks_per_page


@pytest.mark.parametrize("layout", LAYOUTS)
def test_live_blocks_keep_their_data_while_others_churn_through_unmap_and_remap(make_pool, layout):
    pool = make_pool(layout, num_layers=2, block_size=4, num_kv_heads=2, head_dim=8, virtual_bytes=8 * MiB)
    # Live blocks spread over several pages, with holes freed between them.
    spread = pool.alloc(pool.blocks_per_page * 3)
    keep = spread[::3]
    pool.free([b for b in spread if b not in keep])
    cached = pool.alloc(2)
    for i, b in enumerate(keep + cached):
        write_block(pool, b, 100.0 + i)
    pool.cache(cached)
    remapped_pages = 0
    for round_ in range(12):
        churn = pool.alloc(pool.blocks_per_page * 2 + round_)
        assert churn is not None
        for b in churn:
            write_block(pool, b, -1.0)
        pool.free(churn)
        before = pool.stats().num_pages_unmapped_total
        pool.set_limit_bytes(0)  # trims every page without a live block...
        pool.set_limit_bytes(None)  # ...and lets them be mapped again next round
        remapped_pages += pool.stats().num_pages_unmapped_total - before
    assert remapped_pages >= 12
    for i, b in enumerate(keep + cached):
        assert block_holds(pool, b, 100.0 + i), f"block {b} changed"
    assert pool.reuse(cached) is True
    pool.check_integrity()


def test_remapped_blocks_are_fresh_memory(make_pool):
    pool = make_pool(KVLayout.FLASHINFER)
    ids = pool.alloc(pool.blocks_per_page * 2)
    for b in ids:
        write_block(pool, b, 7.0)
    pool.free(ids)
    pool.set_limit_bytes(0)
    pool.set_limit_bytes(None)
    again = pool.alloc(pool.blocks_per_page * 2)
    assert sorted(again) == sorted(ids)
    fresh = [b for b in again if b >= pool.blocks_per_page]  # page 0 (pinned) never left
    assert fresh and all(bool((view == 0).all()) for b in fresh for view in block_views(pool, b))


def shared_resident_bytes() -> int:
    return psutil.Process().memory_info().shared


def test_memory_really_returns_after_a_burst_within_the_trim_time():
    reserve = ReserveConfig(min_pages=1, max_pages=16, trim_idle_s=0.2, tick_s=0.005, idle_tick_s=0.02)
    pool = KVPool(
        4, KVLayout.VLLM_FLASH, 16, 4, 64, torch.float16,
        backend=host_backend(512 * MiB), virtual_bytes=256 * MiB, page_bytes=GRANULARITY, reserve=reserve,
    )  # fmt: skip
    try:
        group = pool.group_bytes
        idle = shared_resident_bytes()
        burst = [pool.alloc(pool.blocks_per_page) for _ in range(64)]  # 64 page groups = 32 MiB
        for ids in burst:
            for t in pool.kv_tensors:
                t[:, ids] = 1.0  # touch every byte: resident now
        peak = shared_resident_bytes()
        assert peak - idle >= 60 * group
        for ids in burst:
            pool.free(ids)
        freed_at = time.monotonic()

        def returned() -> bool:  # resident memory gone, and the unmaps done with
            return shared_resident_bytes() - idle <= 3 * group and pool.stats().mapped_bytes <= 2 * group

        while not returned() and time.monotonic() - freed_at < 5:
            time.sleep(0.01)
        took = time.monotonic() - freed_at
        s = pool.stats()
        assert shared_resident_bytes() - idle <= 3 * group, f"still {shared_resident_bytes() - idle} bytes resident"
        assert took < reserve.trim_idle_s + 0.5, f"took {took:.2f} s"
        assert s.mapped_bytes <= 2 * group and s.reserve_bytes <= group  # the pinned page + at most one
    finally:
        pool.close()


def test_close_releases_everything():
    backend = host_backend(64 * MiB)
    pool = KVPool(
        2, "flashinfer", 4, 2, 8, torch.float16, backend=backend, virtual_bytes=4 * MiB, page_bytes=GRANULARITY
    )
    assert pool.layout is KVLayout.FLASHINFER
    pool.alloc(40)
    assert backend.created_bytes > 0
    pool.close()
    assert backend.created_bytes == 0 and pool.kv_tensors == []
    pool.close()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(layout="paged"), ValueError, "'paged' is not a valid KVLayout"),
        (dict(device="tpu"), ValueError, "device must be 'host', 'cuda', 'cuda:N' or 'auto', got 'tpu'"),
        (dict(device="host:1"), ValueError, "device must be"),
        (dict(page_bytes=GRANULARITY + 4096), ValueError, "page_bytes=69632 must be a positive multiple of 65536"),
        (dict(num_layers=0), ValueError, "num_layers must be a positive integer"),
        (dict(virtual_bytes=1024), ValueError, "less than one page group"),
    ],
)
def test_bad_construction_is_refused(kwargs, error, match):
    args = dict(num_layers=2, layout=KVLayout.VLLM_FLASH, block_size=4, num_kv_heads=2, head_dim=8, dtype=torch.float16)
    extra = dict(virtual_bytes=4 * MiB, page_bytes=GRANULARITY)
    for key in ("num_layers", "layout"):
        args[key] = kwargs.pop(key, args[key])
    extra.update(kwargs)
    if "device" not in extra:
        extra["backend"] = host_backend(64 * MiB)
    with pytest.raises(error, match=match):
        KVPool(**args, **extra)


def test_device_host_builds_its_own_backend(monkeypatch):
    monkeypatch.setenv("KVCACHED_HOST_CAP", "32MiB")
    pool = KVPool(2, KVLayout.MLA, 4, 1, 64, torch.bfloat16, device="host", page_bytes=GRANULARITY * 32)
    try:
        assert pool.backend.name == "host" and pool.stats().virtual_bytes == 32 * MiB
        assert pool.alloc(3) is not None
    finally:
        pool.close()


@pytest.mark.parametrize("bad", [0, -1])
def test_bad_block_counts_and_ids(make_pool, bad):
    pool = make_pool()
    ids = pool.alloc(3)
    before = pool.stats()
    with pytest.raises(ValueError, match="num_blocks"):
        pool.alloc(bad)
    with pytest.raises(ValueError, match=r"unknown ids .*\[123456\]"):
        pool.free([ids[0], 123456])
    pool.free(ids[:1])
    with pytest.raises(ValueError, match=rf"double free\?\) \[{ids[0]}\]"):
        pool.free(ids[:1])
    pool.cache(ids[1:2])
    pool.free(ids[1:2])
    with pytest.raises(ValueError, match="double free"):
        pool.free(ids[1:2])  # a cached block freed twice
    with pytest.raises(ValueError, match="limit_bytes must be an integer >= 0"):
        pool.set_limit_bytes(-1)
    assert pool.stats().limit_bytes is None and pool.stats().num_denied == before.num_denied
    pool.check_integrity()


def test_handle_mode_default_and_override(make_pool, monkeypatch):
    monkeypatch.delenv("KVCACHED_HANDLE_MODE", raising=False)
    assert make_pool().arena.handle_mode == "group"  # "auto": the host backend can slice one handle
    monkeypatch.setenv("KVCACHED_HANDLE_MODE", "per_range")
    assert make_pool().arena.handle_mode == "per_range"
    assert make_pool(handle_mode="group").arena.handle_mode == "group"
