"""PagePool over a scriptable mapper: reserve, limit, eviction, failures, threads."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from poolkit import MANUAL, FakeMapper

from kvcached.pool import PagePool, PoolError, ReserveConfig

BPP = 4
BLOCK = 1000  # bytes per block
GROUP = BPP * BLOCK


def make(
    num_pages: int = 8, cap_pages: int | None = None, reserve: ReserveConfig = MANUAL, **kwargs
) -> tuple[PagePool, FakeMapper]:
    mapper = FakeMapper(GROUP, cap_pages)
    pool = PagePool(
        mapper, num_pages=num_pages, blocks_per_page=BPP, block_bytes=BLOCK, reserve=reserve,
        start_thread=kwargs.pop("start_thread", False), **kwargs,
    )  # fmt: skip
    return pool, mapper


def test_starts_with_only_the_pinned_page_mapped():
    pool, mapper = make()
    assert mapper.mapped == {0}
    s = pool.stats()
    assert (s.mapped_bytes, s.free_bytes, s.used_bytes, s.reserve_bytes) == (GROUP, 3 * BLOCK, 0, 0)
    assert s.num_blocks_total == 32 and s.num_blocks_pinned == 1
    pool.check_integrity()


def test_reserve_covers_the_hot_path_without_mapper_calls():
    pool, mapper = make(reserve=ReserveConfig(min_pages=3, max_pages=3, trim_idle_s=3600))
    assert len(mapper.mapped) == 4 and pool.stats().reserve_bytes == 3 * GROUP
    calls = len(mapper.calls)
    held = [pool.alloc(1) for _ in range(15)]
    assert len(mapper.calls) == calls and pool.stats().num_sync_maps == 0
    assert pool.alloc(1) is not None  # the reserve is gone: mapped on the caller's thread
    assert pool.stats().num_sync_maps == 1 and len(mapper.mapped) == 5
    for ids in held:
        pool.free(ids)
    pool.check_integrity()


def test_alloc_maps_what_it_needs_when_the_reserve_is_short():
    pool, mapper = make()
    ids = pool.alloc(10)
    assert ids is not None and len(set(ids)) == 10
    assert mapper.mapped == {0, 1, 2} and mapper.calls[-1] == ("map", (1, 2))
    pool.check_integrity()


def test_idle_trim_returns_the_reserve_but_keeps_the_minimum():
    cfg = ReserveConfig(min_pages=1, max_pages=8, trim_idle_s=0.5, lead_s=1.0)
    pool, mapper = make(reserve=cfg)
    t = time.monotonic()
    ids = pool.alloc(20)
    pool.free(ids)
    pool.maintain(t + 0.1)  # busy: the draw rate keeps pages around
    assert pool.stats().reserve_bytes > GROUP
    pool.maintain(t + 0.7)  # no allocation for 0.6 s > trim_idle_s
    assert pool.stats().reserve_bytes == GROUP and len(mapper.mapped) == 2
    pool.check_integrity()


def test_limit_applies_now_and_blocks_grants_until_live_blocks_fit():
    pool, mapper = make(reserve=ReserveConfig(min_pages=3, max_pages=3, trim_idle_s=3600))
    full = pool.alloc(7)  # page 0 (3 blocks) and one whole page
    single = pool.alloc(1)  # one block of a third page; one empty page left
    assert full is not None and single is not None and len(mapper.mapped) == 4
    met = []
    assert pool.set_limit_bytes(2 * GROUP, on_met=lambda: met.append(True)) is False
    assert not pool.limit_met and met == [] and pool.alloc(1) is None
    assert len(mapper.mapped) == 3  # the empty page went at once; pages with live blocks stay
    pool.free(single)
    pool.maintain()
    assert pool.limit_met and met == [True] and len(mapper.mapped) == 2
    assert pool.alloc(1) is None  # both pages full: a third would break the limit
    s = pool.stats()
    assert s.demand_bytes == BLOCK and s.num_denied == 2 and s.mapped_bytes == 2 * GROUP
    pool.set_limit_bytes(None)
    assert pool.alloc(1) is not None and met == [True]
    pool.check_integrity()


def test_limit_evicts_cached_pages_first_and_calls_back():
    evicted: list[list[int]] = []
    pool, mapper = make(on_evict=evicted.append)
    ids = pool.alloc(11)  # pages 0..2 full
    pool.cache([b for b in ids if b // BPP == 1])
    pool.cache([b for b in ids if b // BPP == 2][:2])
    assert pool.set_limit_bytes(2 * GROUP) is True
    assert [sorted(e) for e in evicted] == [[4, 5, 6, 7]]
    assert mapper.mapped == {0, 2} and pool.num_cached_blocks == 2
    pool.check_integrity()


@pytest.mark.parametrize("bad", [-1, 1.5, "1G", True])
def test_bad_limit_is_refused_and_changes_nothing(bad):
    pool, _ = make()
    pool.set_limit_bytes(5 * GROUP)
    before = pool.stats()
    with pytest.raises(ValueError, match="limit_bytes must be an integer >= 0"):
        pool.set_limit_bytes(bad)
    assert pool.stats() == before and pool.limit_bytes == 5 * GROUP


@pytest.mark.parametrize("bad", [0, -3, 1.0, "2", None])
def test_bad_alloc_count_is_refused(bad):
    pool, _ = make()
    with pytest.raises(ValueError, match="num_blocks"):
        pool.alloc(bad)
    assert pool.stats().num_allocs == 0


def test_numpy_counts_are_accepted():
    pool, _ = make()
    assert len(pool.alloc(np.int64(3))) == 3


def test_physical_refusal_falls_back_on_the_cache_then_denies():
    pool, mapper = make(cap_pages=2)
    ids = pool.alloc(7)
    assert ids is not None and len(mapper.mapped) == 2
    pool.cache(ids[:3])
    got = pool.alloc(3)  # mapping a third page is refused: evict the cache
    assert got is not None and pool.num_cached_blocks == 0 and set(got) == set(ids[:3])
    assert pool.alloc(1) is None
    s = pool.stats()
    assert s.demand_bytes == BLOCK and s.num_denied == 1 and s.num_evicted == 3
    pool.check_integrity()


def test_mapper_failure_propagates_and_rolls_back():
    pool, mapper = make()
    mapper.fail_map = RuntimeError("driver on fire")
    with pytest.raises(RuntimeError, match="on fire"):
        pool.alloc(5)
    pool.check_integrity()
    mapper.fail_map = None
    assert pool.alloc(5) is not None
    ids = pool.alloc(3)
    pool.free(ids)
    mapper.fail_unmap = RuntimeError("stuck")
    with pytest.raises(RuntimeError, match="stuck"):
        pool.set_limit_bytes(2 * GROUP)
    pool.check_integrity()
    mapper.fail_unmap = None
    pool.maintain()
    assert pool.limit_met
    pool.check_integrity()


def test_cache_bound_evicts_least_recent():
    evicted: list[list[int]] = []
    pool, _ = make(cache_limit_bytes=3 * BLOCK, on_evict=evicted.append)
    ids = pool.alloc(6)
    for b in ids:
        pool.cache([b])
    assert pool.num_cached_blocks == 3 and [b for e in evicted for b in e] == ids[:3]
    assert pool.reuse(ids[:1]) is False and pool.reuse(ids[3:4]) is True
    pool.check_integrity()


def test_close_makes_alloc_raise():
    pool, _ = make()
    pool.close()
    with pytest.raises(PoolError, match="closed"):
        pool.alloc(1)
    pool.close()


def wait_for(condition, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.002)
    return True


def test_reserve_thread_refills_after_draws():
    cfg = ReserveConfig(min_pages=2, max_pages=4, trim_idle_s=3600, tick_s=0.001, idle_tick_s=0.005)
    pool, _ = make(num_pages=16, reserve=cfg, start_thread=True)
    try:
        held = []
        for _ in range(6):  # each draw is refilled before the next one
            held.append(pool.alloc(4))
            assert wait_for(lambda: pool.stats().reserve_bytes >= 2 * GROUP)
        assert pool.stats().num_sync_maps == 0 and pool.stats().used_bytes == 24 * BLOCK
        for ids in held:
            pool.free(ids)
    finally:
        pool.close()
    pool.check_integrity()


def test_reserve_thread_failure_surfaces_on_the_next_slow_call():
    cfg = ReserveConfig(min_pages=2, max_pages=4, trim_idle_s=3600, tick_s=0.001, idle_tick_s=0.005)
    pool, mapper = make(num_pages=16, reserve=cfg, start_thread=True)
    try:
        mapper.fail_map = RuntimeError("lost the device")
        assert pool.alloc(8) is not None  # served from the reserve; wakes the thread, whose map fails

        def thread_died() -> bool:
            try:
                pool.check_integrity()
            except PoolError:
                return True
            return False

        assert wait_for(thread_died)
        with pytest.raises(PoolError, match="lost the device"):
            pool.alloc(20)
    finally:
        pool.close()


def test_concurrent_allocs_and_frees_hand_out_each_block_once():
    cfg = ReserveConfig(min_pages=1, max_pages=4, trim_idle_s=0.01, tick_s=0.0005, idle_tick_s=0.001)
    pool, _ = make(num_pages=64, reserve=cfg, start_thread=True)
    owners: dict[int, int] = {}
    errors: list[str] = []
    lock = threading.Lock()

    def worker(tid: int) -> None:
        rng = np.random.default_rng(tid)
        mine: list[list[int]] = []
        for _ in range(400):
            if mine and rng.random() < 0.5:
                ids = mine.pop(int(rng.integers(len(mine))))
                with lock:
                    for b in ids:
                        del owners[b]
                pool.free(ids)
            else:
                ids = pool.alloc(int(rng.integers(1, 9)))
                if ids is None:
                    continue
                with lock:
                    for b in ids:
                        if b in owners:
                            errors.append(f"block {b} handed to {tid} while {owners[b]} holds it")
                        owners[b] = tid
                mine.append(ids)
        for ids in mine:
            with lock:
                for b in ids:
                    del owners[b]
            pool.free(ids)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    pool.close()
    assert errors == []
    pool.check_integrity()
    assert pool.stats().used_bytes == 0


def test_trim_reserve_unmaps_every_empty_page_now():
    pool, mapper = make(reserve=ReserveConfig(min_pages=3, max_pages=3, trim_idle_s=3600))
    ids = pool.alloc(5)
    assert len(mapper.mapped) == 4
    assert pool.trim_reserve() == 2  # the page holding the 5th block stays
    assert len(mapper.mapped) == 2 and pool.stats().reserve_bytes == 0
    pool.free(ids)
    assert pool.trim_reserve() == 1
    assert mapper.mapped == {0}
    pool.check_integrity()


def test_without_pinned_blocks_every_page_can_go():
    mapper = FakeMapper(GROUP)
    pool = PagePool(
        mapper,
        num_pages=4,
        blocks_per_page=BPP,
        block_bytes=BLOCK,
        num_pinned_blocks=0,
        reserve=MANUAL,
        start_thread=False,
    )
    assert mapper.mapped == set()
    ids = pool.alloc(8)
    assert sorted(ids) == list(range(8))
    pool.free(ids)
    assert pool.set_limit_bytes(0) is True and mapper.mapped == set()
    assert pool.alloc(1) is None
    pool.check_integrity()


def test_limits_changing_under_concurrent_traffic_never_overshoot():
    cfg = ReserveConfig(min_pages=1, max_pages=6, trim_idle_s=0.01, tick_s=0.0005, idle_tick_s=0.001)
    pool, mapper = make(num_pages=48, reserve=cfg, start_thread=True)
    history = [(time.monotonic(), 48)]  # (when, limit in pages) as set
    overshoot: list[str] = []
    stop = threading.Event()
    original_map = mapper.map

    def checked_map(page_ids):
        # A map admitted under a limit may land just after the limit is lowered: allow the
        # largest limit in effect shortly before (claiming happens just before mapping).
        since = time.monotonic() - 0.05
        before = [pages for when, pages in list(history) if when < since]
        allowed = max(before[-1:] + [pages for when, pages in list(history) if when >= since])
        original_map(page_ids)
        if len(mapper.mapped) > allowed:
            overshoot.append(f"{len(mapper.mapped)} pages mapped, limits in effect at most {allowed}")

    mapper.map = checked_map  # type: ignore[method-assign]

    def worker(seed: int) -> None:
        rng = np.random.default_rng(seed)
        mine: list[list[int]] = []
        while not stop.is_set():
            if mine and rng.random() < 0.45:
                ids = mine.pop(int(rng.integers(len(mine))))
                if rng.random() < 0.3:
                    pool.cache(ids)
                else:
                    pool.free(ids)
            else:
                ids = pool.alloc(int(rng.integers(1, 7)))
                if ids is not None:
                    mine.append(ids)
        for ids in mine:
            pool.free(ids)

    def limiter() -> None:
        rng = np.random.default_rng(99)
        while not stop.is_set():
            pages = int(rng.integers(2, 49))
            history.append((time.monotonic(), pages))  # before: a raised limit admits maps at once
            pool.set_limit_bytes(pages * GROUP)
            time.sleep(0.002)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(3)] + [threading.Thread(target=limiter)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    stop.set()
    for t in threads:
        t.join()
    pool.close()
    pool.check_integrity()
    assert overshoot == []
    assert pool.stats().used_bytes == 0 and len(history) > 50
