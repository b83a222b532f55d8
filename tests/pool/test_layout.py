"""Layout arithmetic: exact native shapes and strides, page sizes, and that every block's
bytes lie on its own page group — checked as a bijection over the whole arena."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcached.pool import KVLayout, plan_geometry, view_specs

MiB = 1 << 20
GiB = 1 << 30

# The reference model of the benchmarks: 32 layers, 8 KV heads, head dim 128, bf16, 16-token blocks.
REF = dict(num_layers=32, block_size=16, num_kv_heads=8, head_dim=128, itemsize=2)


@pytest.mark.parametrize(
    ("layout", "ranges", "range_block", "page", "bpp", "shape", "strides"),
    [
        (KVLayout.VLLM_FLASH, 64, 32 * 1024, 2 * MiB, 64, (2, 40960, 16, 8, 128), (40960 * 16384, 16384, 1024, 128, 1)),
        (KVLayout.FLASHINFER, 32, 64 * 1024, 2 * MiB, 32, (40960, 2, 16, 8, 128), (32768, 16384, 1024, 128, 1)),
        (KVLayout.SGLANG, 64, 32 * 1024, 2 * MiB, 64, (2, 40960 * 16, 8, 128), (40960 * 16384, 1024, 128, 1)),
        (KVLayout.COMPOUND, 1, 2 * MiB, 2 * MiB, 1, (2, 40960, 16, 8, 128), (16384, 32 * 32768, 1024, 128, 1)),
    ],
)
def test_reference_model_geometry(layout, ranges, range_block, page, bpp, shape, strides):
    geo = plan_geometry(layout, **REF, granularity=2 * MiB, virtual_bytes=80 * GiB)
    assert (geo.num_ranges, geo.range_block_bytes, geo.page_bytes, geo.blocks_per_page) == (
        ranges,
        range_block,
        page,
        bpp,
    )
    assert geo.num_blocks == 40960 and geo.virtual_bytes == 80 * GiB
    assert geo.block_bytes == 32 * 2 * 16 * 8 * 128 * 2  # every layer's K and V of one block
    assert geo.group_bytes == geo.block_bytes * bpp
    specs = view_specs(geo)
    assert len(specs) == 32
    assert specs[0].shape == shape and specs[0].strides == strides
    if layout is KVLayout.COMPOUND:  # layers interleave inside range 0
        assert [s.offset_bytes for s in specs[:3]] == [0, 65536, 2 * 65536]
    else:  # layers one after another, each contiguous
        step = geo.range_bytes * (2 if layout in (KVLayout.VLLM_FLASH, KVLayout.SGLANG) else 1)
        assert [s.offset_bytes for s in specs[:3]] == [0, step, 2 * step]
        assert torch.empty(0).new_empty(specs[0].shape, device="meta").stride() == specs[0].strides


def test_mla_page_is_the_smallest_common_multiple():
    # DeepSeek-style latent cache: 576 bf16 values per token, 16 tokens: 18 KiB a block.
    geo = plan_geometry(KVLayout.MLA, 61, 16, 1, 576, 2, granularity=2 * MiB, virtual_bytes=64 * GiB)
    assert geo.range_block_bytes == 18 * 1024
    assert geo.page_bytes == 18 * MiB and geo.blocks_per_page == 1024
    assert view_specs(geo)[1].shape == (geo.num_blocks, 16, 576)
    assert view_specs(geo)[1].strides == (16 * 576, 576, 1)


def test_page_size_is_rounded_up_to_a_valid_multiple():
    geo = plan_geometry(
        KVLayout.FLASHINFER, 2, 16, 12, 128, 2, granularity=2 * MiB, virtual_bytes=GiB, min_page_bytes=2 * MiB
    )
    assert geo.range_block_bytes == 96 * 1024 and geo.page_bytes == 6 * MiB  # lcm(2 MiB, 96 KiB)
    geo = plan_geometry(
        KVLayout.VLLM_FLASH, 2, 16, 8, 128, 2, granularity=2 * MiB, virtual_bytes=GiB, min_page_bytes=5 * MiB
    )
    assert geo.page_bytes == 6 * MiB and geo.blocks_per_page == 192


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(page_bytes=3 * MiB), "page_bytes=3145728 must be a positive multiple of 2097152"),
        (dict(page_bytes=0), "page_bytes=0"),
        (dict(virtual_bytes=MiB), "less than one page group"),
        (dict(num_layers=0), "num_layers must be a positive integer, got 0"),
        (dict(block_size=-16), "block_size must be a positive integer"),
        (dict(head_dim=1.5), "head_dim must be a positive integer"),
        (dict(layout="vllm_flash"), "layout must be a KVLayout"),
    ],
)
def test_bad_geometry_is_refused_with_the_value_named(kwargs, match):
    args = dict(layout=KVLayout.VLLM_FLASH, **REF, granularity=2 * MiB, virtual_bytes=GiB)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        plan_geometry(**args)


def block_elements(layout: KVLayout, view: torch.Tensor, block: int, block_size: int) -> torch.Tensor:
    """Flat element indices of one block in one layer view over ``arange``."""
    if layout in (KVLayout.VLLM_FLASH, KVLayout.COMPOUND):
        return view[:, block].reshape(-1)
    if layout is KVLayout.SGLANG:
        return view[:, block * block_size : (block + 1) * block_size].reshape(-1)
    return view[block].reshape(-1)


@settings(max_examples=60, deadline=None)
@given(
    layout=st.sampled_from(list(KVLayout)),
    num_layers=st.integers(1, 3),
    block_size=st.integers(1, 4),
    num_kv_heads=st.integers(1, 3),
    head_dim=st.integers(1, 4),
    itemsize=st.sampled_from([1, 2, 4]),
    granularity=st.sampled_from([64, 256]),
    num_pages=st.integers(1, 3),
)
def test_every_byte_belongs_to_exactly_one_block_on_its_page(
    layout, num_layers, block_size, num_kv_heads, head_dim, itemsize, granularity, num_pages
):
    probe = plan_geometry(
        layout, num_layers, block_size, num_kv_heads, head_dim, itemsize, granularity=granularity, virtual_bytes=1 << 40
    )
    geo = plan_geometry(
        layout, num_layers, block_size, num_kv_heads, head_dim, itemsize,
        granularity=granularity, virtual_bytes=num_pages * probe.group_bytes,
    )  # fmt: skip
    assert geo.num_pages == num_pages and geo.page_bytes % granularity == 0
    # Element-granular model of the arena (all views here are element-aligned).
    total = geo.virtual_bytes // itemsize
    flat = torch.arange(total)
    owner = torch.full((total,), -1)
    for spec in view_specs(geo):
        assert spec.offset_bytes % itemsize == 0
        view = flat.as_strided(spec.shape, spec.strides, spec.offset_bytes // itemsize)
        for block in range(geo.num_blocks):
            elems = block_elements(layout, view, block, block_size)
            assert (owner[elems] == -1).all(), "two blocks (or layers) share bytes"
            owner[elems] = block
            offset_in_range = (elems * itemsize) % geo.range_bytes
            assert (offset_in_range // geo.page_bytes == block // geo.blocks_per_page).all(), "block off its page"
    assert (owner >= 0).all(), "bytes of the arena belong to no block"
    assert ((torch.bincount(owner) * itemsize) == geo.block_bytes).all()
