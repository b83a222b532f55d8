"""What the worker side and the scheduler side of one vLLM process share.

With one GPU (``UniProcExecutor``) vLLM's worker and scheduler live in the EngineCore
process. The worker creates the KV tensors over an arena (:func:`register_worker_kv`);
the scheduler's block pool then finds that arena (:func:`make_pages`) and maps page
groups in it as blocks are handed out, and the engine registers in the control plane.

A block pool built where no worker registered (vLLM's own unit tests, or a scheduler
whose workers live in other processes) gets a small arena of its own on the host
backend, so its bookkeeping maps and unmaps real memory; with tensor or pipeline
parallel workers that would leave the GPU tensors unmapped, so the worker side refuses
that configuration at start (see :mod:`kvcached.integrations.vllm.worker`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kvcached import _vmm, envs
from kvcached.integrations.vllm.pages import VllmPages

__all__ = ["WorkerKV", "current_pages", "make_pages", "register_worker_kv", "worker_kv"]

_log = logging.getLogger("kvcached.vllm")
_lock = threading.Lock()
_HOST_PAGE_BYTES = 64 << 10  # page of the stand-in arena: small, so tests stay light


@dataclass
class WorkerKV:
    """The KV memory one worker made: an arena whose page groups hold ``blocks_per_page`` blocks."""

    arena: _vmm.Arena
    backend: _vmm.Backend
    num_blocks: int
    blocks_per_page: int
    block_bytes: int  # one block across every range
    model_name: str
    pages: VllmPages | None = None
    handle: Any = None  # the control-plane EngineHandle
    rewrites_blocks: bool = False  # the runner rewrites moved blocks' rows (compaction)


_worker: WorkerKV | None = None


def register_worker_kv(kv: WorkerKV) -> None:
    """Record the KV arena of this process's worker (one per process)."""
    global _worker
    with _lock:
        _worker = kv


def worker_kv() -> WorkerKV | None:
    return _worker


def current_pages() -> VllmPages | None:
    """The page table of this process's engine, once its block pool exists."""
    kv = _worker
    return None if kv is None else kv.pages


def make_pages(num_blocks: int, evict_cached: Callable[[list[int]], None]) -> VllmPages:
    """The page table for a block pool of ``num_blocks`` blocks.

    Over the worker's arena when one registered (and then attached to the control
    plane), else over a stand-in host arena.

    Raises:
        ValueError: the worker's arena was made for a different number of blocks.
    """
    trim_idle_s = envs.get("KVCACHED_TRIM_IDLE_S")
    reserve_pages = envs.get("KVCACHED_RESERVE_MIN_PAGES")
    with _lock:
        kv = _worker
        if kv is not None and kv.pages is None:
            if kv.num_blocks != num_blocks:
                raise ValueError(
                    f"kvcached: the worker made KV tensors for {kv.num_blocks} blocks but the scheduler "
                    f"asks for {num_blocks}; --num-gpu-blocks-override must not change between them"
                )
            pages = VllmPages(
                kv.arena,
                num_blocks=num_blocks,
                blocks_per_page=kv.blocks_per_page,
                block_bytes=kv.block_bytes,
                evict_cached=evict_cached,
                trim_idle_s=trim_idle_s,
                reserve_pages=reserve_pages,
                idle_cache_bytes=envs.get("KVCACHED_IDLE_CACHE_MAX"),
                pack=envs.get("KVCACHED_PACK"),
            )
            kv.pages = pages
            kv.handle = _attach(pages, kv)
            if kv.handle is not None:
                pages.budget_room = kv.handle.budget_room_bytes
            return pages
    return _standalone_pages(num_blocks, evict_cached, trim_idle_s, reserve_pages)


def _standalone_pages(
    num_blocks: int, evict_cached: Callable[[list[int]], None], trim_idle_s: float, reserve_pages: int
) -> VllmPages:
    blocks_per_page = next(n for n in (16, 8, 4, 2, 1) if num_blocks % n == 0)
    num_pages = num_blocks // blocks_per_page
    backend = _vmm.HostBackend(num_pages * _HOST_PAGE_BYTES + _HOST_PAGE_BYTES, _HOST_PAGE_BYTES)
    arena = _vmm.Arena(backend, 1, num_pages * _HOST_PAGE_BYTES, _HOST_PAGE_BYTES)
    return VllmPages(
        arena,
        num_blocks=num_blocks,
        blocks_per_page=blocks_per_page,
        block_bytes=_HOST_PAGE_BYTES // blocks_per_page,
        evict_cached=evict_cached,
        trim_idle_s=trim_idle_s,
        reserve_pages=reserve_pages,
        idle_cache_bytes=envs.get("KVCACHED_IDLE_CACHE_MAX"),
        pack=envs.get("KVCACHED_PACK"),
    )


def _attach(pages: VllmPages, kv: WorkerKV) -> Any:
    from kvcached.control import attach_engine, registry

    name = envs.get("KVCACHED_ENGINE_NAME") or registry.name_from_model(kv.model_name, "vllm")
    try:
        backend: Any = kv.backend
        return attach_engine(pages, name, kv.model_name, "vllm", arena=kv.arena, backend=backend)
    except Exception as exc:
        # The engine runs on without the control plane only if the user asked for that.
        if envs.get("KVCACHED_REQUIRE_CONTROL"):
            raise
        _log.warning("kvcached: not registered in the control plane (%s); limits cannot be set from kvctl", exc)
        return None
