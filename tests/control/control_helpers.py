"""Real pools on the host backend, and engine processes for the multi-process tests.

The pools are ``PagePool`` over a real ``kvcached._vmm.Arena`` on the host backend: the
pool machinery of ``KVPool`` without the torch tensors, so a spawned engine starts in
well under a second (importing torch in eight processes on two cores takes a minute).
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass
from typing import Any

from kvcached.control import EngineHandle, attach_engine

MiB = 1 << 20
PAGE_BYTES = 2 * MiB
BLOCKS_PER_PAGE = 16


@dataclass
class HostPool:
    """A real pool, its arena and backend (what ``KVPool`` bundles)."""

    pool: Any
    arena: Any
    backend: Any

    def close(self) -> None:
        self.pool.close()
        self.arena.close()


def make_pool(num_pages: int = 32, start_thread: bool = True, reserve_pages: int = 0) -> HostPool:
    """A pool of ``num_pages`` 2 MiB page groups keeping ``reserve_pages`` mapped ahead when idle."""
    from kvcached import _vmm
    from kvcached.pool import PagePool, ReserveConfig

    backend = _vmm.HostBackend(num_pages * PAGE_BYTES)
    arena = _vmm.Arena(backend, 1, num_pages * PAGE_BYTES, PAGE_BYTES)
    reserve = ReserveConfig(
        min_pages=reserve_pages, max_pages=max(reserve_pages, 1), trim_idle_s=0.05, idle_tick_s=0.01
    )
    pool = PagePool(
        arena,
        num_pages=num_pages,
        blocks_per_page=BLOCKS_PER_PAGE,
        block_bytes=PAGE_BYTES // BLOCKS_PER_PAGE,
        num_pinned_blocks=0,
        reserve=reserve,
        start_thread=start_thread,
    )
    return HostPool(pool, arena, backend)


def attach(hp: HostPool, shm_name: str, name: str, **kwargs: Any) -> EngineHandle:
    kwargs.setdefault("headroom_bytes", 0)
    kwargs.setdefault("limit_bytes", None)
    return attach_engine(hp.pool, name, "test/model", "other", shm_name, arena=hp.arena, backend=hp.backend, **kwargs)


def alloc_pages(hp: HostPool, num_pages: int) -> list[int]:
    """Allocate whole pages' worth of blocks; the blocks, or [] if refused."""
    return hp.pool.alloc(num_pages * BLOCKS_PER_PAGE) or []


def settle(hp: HostPool, timeout_s: float = 2.0) -> int:
    """Wait until the arena's mapped bytes stop changing for 0.1 s; return them."""
    deadline = time.monotonic() + timeout_s
    last, since = hp.arena.mapped_bytes, time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.01)
        now = hp.arena.mapped_bytes
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= 0.1:
            break
    return int(last)


# -- engine processes (targets of multiprocessing "spawn") ---------------------------


def idle_engine(shm_name: str, name: str, hold_pages: int, reserve_pages: int, report: Any, stop: Any) -> None:
    """Hold ``hold_pages`` pages of used blocks and a reserve, then idle until ``stop``."""
    hp = make_pool(16, reserve_pages=reserve_pages)
    handle = attach(hp, shm_name, name)
    held = alloc_pages(hp, hold_pages)
    report.put((name, len(held) // BLOCKS_PER_PAGE))
    stop.wait(120)
    report.put((name, settle(hp)))
    handle.close()
    hp.close()


def churn_engine(shm_name: str, name: str, seconds: float, seed: int, report: Any, go: Any, stop: Any) -> None:
    """On ``go``, allocate and free at random for ``seconds``, keep what it holds, report the
    arena's settled mapped bytes, and exit on ``stop``."""
    rng = random.Random(seed)
    hp = make_pool(16)
    handle = attach(hp, shm_name, name)
    report.put((name, "ready"))
    go.wait(60)
    held: list[list[int]] = []
    num_denied = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if held and rng.random() < 0.45:
            hp.pool.free(held.pop(rng.randrange(len(held))))
        else:
            ids = hp.pool.alloc(rng.randint(1, 2 * BLOCKS_PER_PAGE))
            if ids is None:
                num_denied += 1
            else:
                held.append(ids)
    report.put((name, settle(hp), num_denied))
    stop.wait(120)
    handle.close()
    hp.close()


def mapping_engine(shm_name: str, name: str, report: Any) -> None:
    """Map and unmap page groups as fast as it can until SIGKILLed."""
    hp = make_pool(8, start_thread=False)
    attach(hp, shm_name, name)
    report.put((name, os.getpid()))
    while True:
        hp.arena.map([0, 1, 2])
        hp.arena.map([3, 4, 5, 6, 7])
        hp.arena.unmap([0, 1, 2, 3, 4, 5, 6, 7])
