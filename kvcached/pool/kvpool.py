"""KVPool: an elastic block pool whose blocks are an engine's KV cache tensors.

The tensors (:attr:`KVPool.kv_tensors`, one per layer, in the engine's native shape
and strides — see :mod:`kvcached.pool.layout`) span the whole virtual capacity at
fixed addresses; physical memory sits only under mapped page groups. Reading or
writing a block is safe while it is used, cached or pinned (block 0); any other
block may be unmapped, and touching unmapped memory kills the process (host) or the
CUDA context (GPU).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kvcached import envs
from kvcached.pool.layout import KVLayout, PoolGeometry, plan_geometry, view_specs
from kvcached.pool.pagepool import EvictCallback, PagePool
from kvcached.pool.reserve import ReserveConfig

if TYPE_CHECKING:
    import torch

__all__ = ["KVPool", "parse_device"]


def parse_device(device: object) -> tuple[str, int]:
    """``"host"``, ``"cpu"``, ``"auto"``, ``"cuda"``, ``"cuda:N"`` or a ``torch.device``
    → ``(backend kind, device index)``."""
    text = str(device).strip().lower()
    kind, _, index = text.partition(":")
    if kind == "cpu":
        kind = "host"
    if kind not in ("host", "cuda", "auto") or (index and (not index.isdigit() or kind != "cuda")):
        raise ValueError(f"device must be 'host', 'cuda', 'cuda:N' or 'auto', got {device!r}")
    return kind, int(index or 0)


class KVPool(PagePool):
    """The KV cache of one model on one device, mapped on demand.

    Args:
        num_layers, block_size, num_kv_heads, head_dim: the model's KV shape (for MLA
            pass ``num_kv_heads=1`` and the latent ``head_size`` as ``head_dim``).
        layout: a :class:`KVLayout` (or its value, e.g. ``"vllm_flash"``).
        dtype: the KV dtype (a ``torch.dtype``).
        device: ``"host"``, ``"cuda[:N]"`` or ``"auto"`` (``KVCACHED_BACKEND`` when not given).
        virtual_bytes: capacity across all layers (default: the device's total memory).
        page_bytes: bytes per page in each range (default: ``KVCACHED_PAGE_SIZE``
            rounded up to a multiple of the granularity and the block size in a range).
        handle_mode: ``"group"`` or ``"per_range"`` (default: ``KVCACHED_HANDLE_MODE`` if set,
            else the cheapest mode the backend supports for this layout).
        backend: a ``kvcached._vmm`` backend to use instead of making one from ``device``.
        Others: as :class:`PagePool`.

    Raises:
        ValueError: a bad shape, layout, device or size.
        MemoryError: the pinned page group could not be mapped.
    """

    def __init__(
        self,
        num_layers: int,
        layout: KVLayout | str,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: object = None,
        *,
        virtual_bytes: int | None = None,
        page_bytes: int | None = None,
        handle_mode: str | None = None,
        backend: Any = None,
        cache_limit_bytes: int | None = None,
        limit_bytes: int | None = None,
        reserve: ReserveConfig | None = None,
        start_thread: bool = True,
        on_evict: EvictCallback | None = None,
    ) -> None:
        from kvcached import vmm

        layout = KVLayout(layout) if isinstance(layout, str) else layout
        if backend is None:
            kind, index = parse_device(envs.get("KVCACHED_BACKEND") if device is None else device)
            backend = vmm.make_backend(kind, index)
        if virtual_bytes is None:
            virtual_bytes = backend.mem_info()[1]
        geometry = plan_geometry(
            layout,
            num_layers,
            block_size,
            num_kv_heads,
            head_dim,
            dtype.itemsize,
            granularity=backend.granularity,
            virtual_bytes=virtual_bytes,
            page_bytes=page_bytes,
            min_page_bytes=envs.get("KVCACHED_PAGE_SIZE"),
        )
        if handle_mode is None:
            # "auto" (the default): per-range handles on CUDA, whose cuMemMap takes only
            # offset 0 into a handle; one handle per page group on the host.
            handle_mode = envs.get("KVCACHED_HANDLE_MODE")
        arena = vmm.Arena(backend, geometry.num_ranges, geometry.range_bytes, geometry.page_bytes, handle_mode)
        self.arena = arena
        self.backend = backend
        self.geometry: PoolGeometry = geometry
        self.layout = layout
        self.dtype = dtype
        self.kv_tensors: list[torch.Tensor] = []
        try:
            super().__init__(
                arena,
                num_pages=geometry.num_pages,
                blocks_per_page=geometry.blocks_per_page,
                block_bytes=geometry.block_bytes,
                cache_limit_bytes=cache_limit_bytes,
                limit_bytes=limit_bytes,
                reserve=reserve,
                start_thread=start_thread,
                on_evict=on_evict,
            )
            self.kv_tensors = [
                vmm.tensor_from_range(
                    backend, arena.base_addr + spec.offset_bytes, spec.shape, dtype, spec.strides, owner=arena
                )
                for spec in view_specs(geometry)
            ]
        except BaseException:
            thread = getattr(self, "_thread", None)
            if thread is not None:
                thread.stop()
            arena.close()
            raise

    @property
    def block_size(self) -> int:
        return self.geometry.block_size

    def close(self) -> None:
        """Stop the reserve thread, drop the tensors and release all memory and the
        address range. Tensors taken from :attr:`kv_tensors` must not be used after."""
        super().close()
        self.kv_tensors = []
        if not self.arena.closed:
            self.arena.close()
