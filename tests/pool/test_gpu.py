"""The pool on a real GPU (cuda backend): run by the lead on the GPU machine.

Each scenario runs in a spawned subprocess, so a fault in one (an illegal address
kills the CUDA context) cannot take the others or pytest with it, and no CUDA
context leaks into the test process.
"""

from __future__ import annotations

import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import pytest

from kvcached.pool import KVLayout

pytestmark = pytest.mark.gpu


def cuda_usable() -> bool:
    import torch

    from kvcached import _vmm

    return bool(torch.cuda.is_available()) and _vmm.backend_status().get("cuda") == "ok"


def in_subprocess(fn: Any, *args: Any) -> Any:
    if not cuda_usable():
        pytest.skip("no usable CUDA device")
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as executor:
        return executor.submit(fn, *args).result(timeout=300)


def scenario_data_survives_remaps(layout_value: str) -> dict[str, Any]:
    import torch
    from poolkit import block_holds, write_block

    from kvcached.pool import KVPool, ReserveConfig

    reserve = ReserveConfig(min_pages=0, max_pages=2, trim_idle_s=3600)
    pool = KVPool(
        4,
        layout_value,
        16,
        8,
        128,
        torch.bfloat16,
        device="cuda:0",
        virtual_bytes=8 << 30,
        reserve=reserve,
        start_thread=False,
    )
    ptrs = [t.data_ptr() for t in pool.kv_tensors]
    spread = pool.alloc(pool.blocks_per_page * 3)
    keep = spread[::5]
    pool.free([b for b in spread if b not in keep])
    for i, b in enumerate(keep):
        write_block(pool, b, float(i % 100))
    unmapped = 0
    for round_ in range(8):
        churn = pool.alloc(pool.blocks_per_page * 6 + round_)  # more than the holes between kept blocks
        for b in churn[:: max(1, len(churn) // 16)]:
            write_block(pool, b, -3.0)
        pool.free(churn)
        before = pool.stats().num_pages_unmapped_total
        pool.set_limit_bytes(0)
        pool.set_limit_bytes(None)
        unmapped += pool.stats().num_pages_unmapped_total - before
    torch.cuda.synchronize()
    intact = all(block_holds(pool, b, float(i % 100)) for i, b in enumerate(keep))
    same_ptrs = ptrs == [t.data_ptr() for t in pool.kv_tensors]
    pool.check_integrity()
    pool.close()
    return {"intact": intact, "same_ptrs": same_ptrs, "unmapped": unmapped}


@pytest.mark.parametrize("layout", list(KVLayout))
def test_cuda_data_survives_unmap_and_remap(layout):
    result = in_subprocess(scenario_data_survives_remaps, layout.value)
    assert result["intact"] and result["same_ptrs"] and result["unmapped"] >= 8, result


def scenario_memory_returns(trim_idle_s: float) -> dict[str, Any]:
    import torch

    from kvcached.pool import KVPool, ReserveConfig

    reserve = ReserveConfig(min_pages=1, max_pages=16, trim_idle_s=trim_idle_s)
    pool = KVPool(
        8, KVLayout.VLLM_FLASH, 16, 8, 128, torch.bfloat16, device="cuda:0", virtual_bytes=32 << 30, reserve=reserve
    )
    torch.cuda.init()
    idle_free = torch.cuda.mem_get_info()[0]
    burst = [pool.alloc(pool.blocks_per_page) for _ in range(32)]
    for ids in burst:
        for t in pool.kv_tensors:
            t[:, ids] = 1.0
    torch.cuda.synchronize()
    burst_free = torch.cuda.mem_get_info()[0]
    for ids in burst:
        pool.free(ids)
    freed_at = time.monotonic()
    group = pool.group_bytes
    while idle_free - torch.cuda.mem_get_info()[0] > 3 * group and time.monotonic() - freed_at < 5:
        time.sleep(0.01)
    took = time.monotonic() - freed_at
    after_free = torch.cuda.mem_get_info()[0]
    stats = pool.stats()
    pool.close()
    return {
        "group": group,
        "idle": idle_free,
        "burst": burst_free,
        "after": after_free,
        "took": took,
        "mapped": stats.mapped_bytes,
    }


def test_cuda_memory_returns_after_a_burst_within_the_trim_time():
    r = in_subprocess(scenario_memory_returns, 0.3)
    assert r["idle"] - r["burst"] >= 30 * r["group"]
    assert r["idle"] - r["after"] <= 3 * r["group"], r
    assert r["took"] < 0.3 + 0.5 and r["mapped"] <= 2 * r["group"]
