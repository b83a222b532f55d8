"""The demo engines' KV pool: a small model's KV cache on a real arena.

Two ways to build it, the same pool machinery underneath:

* ``tensors=True``: a :class:`~kvcached.pool.KVPool` with its per-layer torch tensors
  (``KVPool`` needs torch: its ``dtype`` is a ``torch.dtype`` and it builds the views
  at construction). New blocks are written through the tensors.
* ``tensors=False`` (the default): a :class:`~kvcached.pool.PagePool` over an arena of
  exactly the geometry ``KVPool`` would plan (:func:`~kvcached.pool.plan_geometry`),
  without torch. Importing torch takes seconds per process on a small machine, and
  the demo starts several. New blocks are written with ``memset`` on the host backend.

Either way every block handed out is written, so the pool's memory is really resident
(RSS grows and shrinks with the mapped bytes on the host backend).
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kvcached.pool import KVLayout, PagePool, PoolGeometry, ReserveConfig, plan_geometry

__all__ = ["HOST_GRANULARITY", "DemoPool", "ModelShape", "build_pool"]

HOST_GRANULARITY = 64 << 10  # small pages, so memory moves between engines in small steps
_RESERVE = ReserveConfig(min_pages=1, max_pages=8, trim_idle_s=0.5)


@dataclass(frozen=True)
class ModelShape:
    """The KV shape of the demo's stand-in model (fp16, vLLM flash layout)."""

    name: str = "demo/tiny-4L-8H-64D"
    num_layers: int = 4
    num_kv_heads: int = 8
    head_dim: int = 64
    block_size: int = 16
    itemsize: int = 2


class DemoPool:
    """A pool plus what the demo engine needs around it: block writes and shape facts."""

    def __init__(self, pool: Any, arena: Any, backend: Any, geometry: PoolGeometry, tensors: bool) -> None:
        self.pool = pool
        self.arena = arena
        self.backend = backend
        self.geometry = geometry
        self.tensors = tensors
        self._fill = 0

    @property
    def block_size(self) -> int:
        return self.geometry.block_size

    @property
    def block_bytes(self) -> int:
        return self.geometry.block_bytes

    @property
    def group_bytes(self) -> int:
        return self.geometry.group_bytes

    def alloc(self, n: int) -> list[int] | None:
        ids = self.pool.alloc(n)
        if ids is not None:
            self._write(ids)
        return ids

    def free(self, block_ids: Sequence[int]) -> None:
        self.pool.free(block_ids)

    def _write(self, block_ids: list[int]) -> None:
        # Stand-in for the prefill/decode kernels writing K and V into fresh blocks.
        self._fill = (self._fill + 1) & 0x7F
        if self.tensors:
            import torch

            index = torch.tensor(block_ids, dtype=torch.long, device=self.pool.kv_tensors[0].device)
            for layer in self.pool.kv_tensors:
                layer.index_fill_(1, index, float(self._fill))
        elif self.backend.name == "host":
            step = self.geometry.range_block_bytes
            starts = [self.arena.range_addr(r) for r in range(self.geometry.num_ranges)]
            for block in block_ids:
                for start in starts:
                    ctypes.memset(start + block * step, self._fill, step)

    def close(self) -> None:
        self.pool.close()
        if not self.arena.closed:
            self.arena.close()


def _backend(kind: str, cap_bytes: int) -> Any:
    from kvcached import _vmm, vmm

    if kind == "host":
        return _vmm.HostBackend(cap_bytes, HOST_GRANULARITY)
    if kind == "cuda":
        return vmm.make_backend("cuda", 0)
    raise ValueError(f"backend must be 'host' or 'cuda', got {kind!r}")


def build_pool(
    shape: ModelShape,
    backend_kind: str,
    virtual_bytes: int,
    host_cap_bytes: int,
    tensors: bool = False,
    page_bytes: int | None = None,
) -> DemoPool:
    """Make the pool of one demo engine.

    Args:
        shape: the model's KV shape.
        backend_kind: "host" or "cuda" (device 0 as this process sees it).
        virtual_bytes: address space of the whole KV cache.
        host_cap_bytes: physical cap of the host backend.
        tensors: build a torch ``KVPool`` (needs torch) instead of the torch-free pool.
        page_bytes: bytes per page in each range; default the smallest the backend allows.

    Raises:
        ValueError, ImportError (``tensors`` without torch), and the backend's errors.
    """
    backend = _backend(backend_kind, host_cap_bytes)
    if tensors:
        import torch

        from kvcached.pool import KVPool

        kv = KVPool(
            shape.num_layers,
            KVLayout.VLLM_FLASH,
            shape.block_size,
            shape.num_kv_heads,
            shape.head_dim,
            torch.float16,
            backend=backend,
            virtual_bytes=virtual_bytes,
            page_bytes=page_bytes,
            reserve=_RESERVE,
        )
        return DemoPool(kv, kv.arena, backend, kv.geometry, tensors=True)
    from kvcached import _vmm

    geometry = plan_geometry(
        KVLayout.VLLM_FLASH,
        shape.num_layers,
        shape.block_size,
        shape.num_kv_heads,
        shape.head_dim,
        shape.itemsize,
        granularity=backend.granularity,
        virtual_bytes=virtual_bytes,
        page_bytes=page_bytes,
    )
    # cuMemMap maps a physical handle only from offset 0, so on CUDA each range needs its own.
    handle_mode = "per_range" if backend.name == "cuda" and geometry.num_ranges > 1 else "group"
    arena = _vmm.Arena(backend, geometry.num_ranges, geometry.range_bytes, geometry.page_bytes, handle_mode)
    try:
        pool = PagePool(
            arena,
            num_pages=geometry.num_pages,
            blocks_per_page=geometry.blocks_per_page,
            block_bytes=geometry.block_bytes,
            reserve=_RESERVE,
        )
    except BaseException:
        arena.close()
        raise
    return DemoPool(pool, arena, backend, geometry, tensors=False)
