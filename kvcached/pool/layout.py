"""KV cache layouts: where each block of each layer lives in the arena's ranges.

The arena is ``num_ranges`` ranges of ``range_bytes`` each; page ``p`` is the same
``page_bytes`` slice of every range (a *page group*), the unit of mapping. A block
occupies ``range_block_bytes`` in every range it touches, and whole blocks fit a page
exactly (``page_bytes`` is a multiple of ``range_block_bytes``), so block ``b`` lives
on page ``b // blocks_per_page`` and nowhere else: no block straddles two pages, and
every block stride stays uniform (the engines' native layouts need that).

The per-layer views use the engine's native shapes and strides:

============  ===============================  ==========  =====================
layout        per-layer tensor                 ranges      block stride
============  ===============================  ==========  =====================
VLLM_FLASH    ``(2, nb, bs, H, D)``            2 per layer native (contiguous)
FLASHINFER    ``(nb, 2, bs, H, D)``            1 per layer native (contiguous)
MLA           ``(nb, bs, H * D)``              1 per layer native (contiguous)
SGLANG        ``(2, nb * bs, H, D)``: [0] = K  2 per layer native (contiguous)
COMPOUND      ``(2, nb, bs, H, D)``            1 in all    ``L`` times native
============  ===============================  ==========  =====================

VLLM_FLASH and SGLANG put layer ``l``'s K and V in ranges ``2l`` and ``2l + 1``;
since a range holds exactly ``num_blocks`` blocks, the two are adjacent and each
layer's tensor is one contiguous block of memory. COMPOUND keeps all layers' K and V
of a block together (``(nb, L, 2, bs, H, D)``), so a page group is one mapping
however many layers there are, at the price of a block stride ``L`` times the
native one in the attention kernel.

Pure arithmetic: no torch, no driver.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

__all__ = ["KVLayout", "PoolGeometry", "ViewSpec", "plan_geometry", "view_specs"]


class KVLayout(enum.Enum):
    """How the KV cache of all layers is laid out over the arena (see the module doc)."""

    VLLM_FLASH = "vllm_flash"
    FLASHINFER = "flashinfer"
    MLA = "mla"
    SGLANG = "sglang"
    COMPOUND = "compound"


@dataclass(frozen=True)
class PoolGeometry:
    """The sizes that tie a model's KV cache to an arena. All sizes in bytes."""

    layout: KVLayout
    num_layers: int
    block_size: int  # tokens per block
    num_kv_heads: int
    head_dim: int
    itemsize: int  # bytes per element
    num_ranges: int
    range_block_bytes: int  # bytes one block occupies in each range
    page_bytes: int  # bytes of one page in each range (the mapping unit per range)
    num_pages: int  # page groups in the arena
    blocks_per_page: int

    @property
    def range_bytes(self) -> int:
        return self.num_pages * self.page_bytes

    @property
    def block_bytes(self) -> int:
        """Bytes of one block across all ranges (all layers, K and V)."""
        return self.num_ranges * self.range_block_bytes

    @property
    def group_bytes(self) -> int:
        """Bytes of one page group across all ranges: what one page id maps."""
        return self.num_ranges * self.page_bytes

    @property
    def num_blocks(self) -> int:
        return self.num_pages * self.blocks_per_page

    @property
    def virtual_bytes(self) -> int:
        return self.num_ranges * self.range_bytes


@dataclass(frozen=True)
class ViewSpec:
    """One zero-copy tensor over the arena: byte offset from its base, shape, strides in elements."""

    offset_bytes: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]


def _ranges_and_block_bytes(layout: KVLayout, num_layers: int, token_bytes: int, block_size: int) -> tuple[int, int]:
    if layout in (KVLayout.VLLM_FLASH, KVLayout.SGLANG):
        return 2 * num_layers, block_size * token_bytes
    if layout is KVLayout.FLASHINFER:
        return num_layers, 2 * block_size * token_bytes
    if layout is KVLayout.MLA:
        return num_layers, block_size * token_bytes
    if layout is KVLayout.COMPOUND:
        return 1, num_layers * 2 * block_size * token_bytes
    raise ValueError(f"unknown KV layout {layout!r}")


def plan_geometry(
    layout: KVLayout,
    num_layers: int,
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    itemsize: int,
    *,
    granularity: int,
    virtual_bytes: int,
    page_bytes: int | None = None,
    min_page_bytes: int = 0,
) -> PoolGeometry:
    """Choose the page size and capacity for a model's KV cache.

    Args:
        layout: the KV layout.
        num_layers, block_size, num_kv_heads, head_dim, itemsize: the model's KV shape
            (for MLA, ``num_kv_heads * head_dim`` is the latent head size; pass 1 and
            ``head_size``).
        granularity: the backend's mapping granularity in bytes.
        virtual_bytes: the most bytes all ranges together may span (rounded down to
            whole page groups).
        page_bytes: bytes per page in each range; must be a multiple of both the
            granularity and the block's bytes in a range. Default: the smallest such
            multiple that is at least ``min_page_bytes``.
        min_page_bytes: the smallest page size wanted when ``page_bytes`` is not given
            (e.g. ``KVCACHED_PAGE_SIZE``); rounded up to a valid size.

    Raises:
        ValueError: a non-positive count or size, an invalid ``page_bytes``, or
            ``virtual_bytes`` too small for one page group.
    """
    if not isinstance(layout, KVLayout):
        raise ValueError(f"layout must be a KVLayout, not {layout!r}")
    for name, value in (
        ("num_layers", num_layers),
        ("block_size", block_size),
        ("num_kv_heads", num_kv_heads),
        ("head_dim", head_dim),
        ("itemsize", itemsize),
        ("granularity", granularity),
    ):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    token_bytes = num_kv_heads * head_dim * itemsize
    num_ranges, range_block_bytes = _ranges_and_block_bytes(layout, num_layers, token_bytes, block_size)
    unit = math.lcm(granularity, range_block_bytes)
    if page_bytes is None:
        page_bytes = max(unit, -(-min_page_bytes // unit) * unit)
    elif not isinstance(page_bytes, int) or page_bytes <= 0 or page_bytes % unit:
        raise ValueError(
            f"page_bytes={page_bytes!r} must be a positive multiple of {unit} (the granularity "
            f"{granularity} and the {range_block_bytes} bytes a block takes in each range)"
        )
    group_bytes = num_ranges * page_bytes
    num_pages = virtual_bytes // group_bytes if isinstance(virtual_bytes, int) else 0
    if num_pages < 1:
        raise ValueError(f"virtual_bytes={virtual_bytes!r} is less than one page group ({group_bytes} bytes)")
    return PoolGeometry(
        layout=layout,
        num_layers=num_layers,
        block_size=block_size,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        itemsize=itemsize,
        num_ranges=num_ranges,
        range_block_bytes=range_block_bytes,
        page_bytes=page_bytes,
        num_pages=num_pages,
        blocks_per_page=page_bytes // range_block_bytes,
    )


def view_specs(geo: PoolGeometry) -> list[ViewSpec]:
    """The per-layer views, in the order of ``KVPool.kv_tensors`` (one per layer)."""
    nb, bs, h, d = geo.num_blocks, geo.block_size, geo.num_kv_heads, geo.head_dim
    token = h * d  # elements per token per K or V
    block = bs * token  # elements of one block's K (or V) in one layer
    range_elems = geo.range_bytes // geo.itemsize
    specs = []
    for layer in range(geo.num_layers):
        if geo.layout is KVLayout.VLLM_FLASH:
            spec = ViewSpec(2 * layer * geo.range_bytes, (2, nb, bs, h, d), (range_elems, block, token, d, 1))
        elif geo.layout is KVLayout.FLASHINFER:
            spec = ViewSpec(layer * geo.range_bytes, (nb, 2, bs, h, d), (2 * block, block, token, d, 1))
        elif geo.layout is KVLayout.MLA:
            spec = ViewSpec(layer * geo.range_bytes, (nb, bs, token), (block, token, 1))
        elif geo.layout is KVLayout.SGLANG:
            spec = ViewSpec(2 * layer * geo.range_bytes, (2, nb * bs, h, d), (range_elems, token, d, 1))
        else:  # COMPOUND: (nb, L, 2, bs, H, D) in range 0, seen per layer as (2, nb, bs, H, D)
            layer_elems = 2 * block
            spec = ViewSpec(
                layer * layer_elems * geo.itemsize,
                (2, nb, bs, h, d),
                (block, geo.num_layers * layer_elems, token, d, 1),
            )
        specs.append(spec)
    return specs
