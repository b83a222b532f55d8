"""The engine side in one process: ledger wiring, live limits, budget, lifecycle."""

from __future__ import annotations

import multiprocessing as mp
import time
from collections.abc import Iterator

import pytest
from control_helpers import BLOCKS_PER_PAGE, PAGE_BYTES, HostPool, alloc_pages, attach, make_pool

from kvcached.control import (
    FROM_ENV,
    Controller,
    DuplicateName,
    EngineKind,
    EngineState,
    InvalidValue,
    attach_engine,
)
from kvcached.control.layout import EngineState as SlotState


@pytest.fixture
def hp() -> Iterator[HostPool]:
    pool = make_pool(num_pages=16, start_thread=False)
    yield pool
    pool.close()


def _gpu_mapped(ctl: Controller) -> int:
    return ctl.snapshot().gpus[0].mapped_bytes


def test_ledger_counts_every_map_and_unmap(hp: HostPool, shm_name: str, controller: Controller) -> None:
    with attach(hp, shm_name, "a") as handle:
        ids = alloc_pages(hp, 3)
        info = controller.snapshot().engine("a")
        assert info.mapped_bytes == hp.arena.mapped_bytes == 3 * PAGE_BYTES == _gpu_mapped(controller)
        assert (info.page_bytes, info.reserved_bytes, info.state) == (PAGE_BYTES, 16 * PAGE_BYTES, EngineState.RUNNING)
        hp.pool.free(ids)
        hp.pool.set_limit_bytes(0)  # unmaps the now empty pages
        assert controller.snapshot().engine("a").mapped_bytes == 0 == _gpu_mapped(controller)
        assert handle.slot_index == 0
    assert controller.snapshot().engines == []


def test_bytes_mapped_before_attach_are_counted_and_returned_on_close(
    hp: HostPool, shm_name: str, controller: Controller
) -> None:
    alloc_pages(hp, 2)
    handle = attach(hp, shm_name, "late")
    assert controller.snapshot().engine("late").mapped_bytes == 2 * PAGE_BYTES == _gpu_mapped(controller)
    handle.close()
    handle.close()  # idempotent
    assert _gpu_mapped(controller) == 0 and hp.arena.mapped_bytes == 2 * PAGE_BYTES


def test_idle_engine_applies_a_new_limit_within_100ms(hp: HostPool, shm_name: str, controller: Controller) -> None:
    with attach(hp, shm_name, "idle"):
        hp.pool.free(alloc_pages(hp, 8))  # 8 pages mapped, all free: the limit must unmap them
        latencies = []
        for limit_pages in (6, 4, 2, 5, 1, 3, 0, 2, 1, 0):
            start = time.monotonic()
            revision = controller.set_limit("idle", limit_pages * PAGE_BYTES)
            assert controller.wait_applied("idle", revision, timeout_s=1.0)
            latencies.append(time.monotonic() - start)
            assert hp.arena.mapped_bytes <= limit_pages * PAGE_BYTES
            info = controller.snapshot().engine("idle")
            assert (info.applied_revision, info.applied_limit_bytes, info.limit_met) == (
                revision,
                limit_pages * PAGE_BYTES,
                True,
            )
        assert max(latencies) < 0.1, latencies


def test_live_blocks_over_the_limit_block_new_allocations(hp: HostPool, shm_name: str, controller: Controller) -> None:
    with attach(hp, shm_name, "busy"):
        held = alloc_pages(hp, 4)
        assert controller.wait_applied("busy", controller.set_limit("busy", 2 * PAGE_BYTES))
        info = controller.snapshot().engine("busy")
        assert not info.limit_met and info.mapped_bytes == 4 * PAGE_BYTES
        assert hp.pool.alloc(1) is None
        hp.pool.free(held)
        assert controller.wait_applied("busy", controller.set_limit("busy", None))
        assert hp.pool.alloc(1) is not None


def test_budget_is_shared_by_engines_on_one_gpu(shm_name: str, controller: Controller) -> None:
    a, b = make_pool(8, start_thread=False), make_pool(8, start_thread=False)
    try:
        with attach(a, shm_name, "a"), attach(b, shm_name, "b"):
            controller.set_budget(0, 4 * PAGE_BYTES)
            held = alloc_pages(a, 3)
            assert len(held) == 3 * BLOCKS_PER_PAGE
            assert alloc_pages(b, 2) == []  # would take the GPU to 5 pages
            assert len(alloc_pages(b, 1)) == BLOCKS_PER_PAGE
            a.pool.free(held)
            assert controller.wait_applied("a", controller.set_limit("a", 0))
            assert len(alloc_pages(b, 3)) == 3 * BLOCKS_PER_PAGE
            time.sleep(0.05)  # a watcher round publishes the counters
            snap = controller.snapshot()
            assert snap.gpus[0].mapped_bytes == 4 * PAGE_BYTES == sum(e.mapped_bytes for e in snap.engines)
            assert snap.engine("b").num_denied == 1
    finally:
        a.close()
        b.close()


def test_initial_limit_weight_and_min(
    hp: HostPool, shm_name: str, controller: Controller, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KVCACHED_LIMIT", "25%")
    with attach(hp, shm_name, "e", limit_bytes=FROM_ENV, weight=3, min_bytes=PAGE_BYTES):
        info = controller.snapshot().engine("e")
        total = controller.snapshot().gpus[0].total_bytes
        assert (info.limit_bytes, info.applied_limit_bytes) == (total // 4, total // 4)
        assert (info.weight, info.min_bytes, info.kind) == (3.0, PAGE_BYTES, EngineKind.OTHER)
        assert hp.pool.limit_bytes == total // 4


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kind": "tgi"},
        {"weight": 0},
        {"weight": float("nan")},
        {"min_bytes": -1},
        {"limit_bytes": -5},
        {"headroom_bytes": 1.5},
    ],
)
def test_bad_attach_arguments_claim_nothing(hp: HostPool, shm_name: str, controller: Controller, kwargs: dict) -> None:
    kind = kwargs.pop("kind", "other")
    with pytest.raises(InvalidValue):
        attach_engine(hp.pool, "x", "m", kind, shm_name, arena=hp.arena, backend=hp.backend, **kwargs)
    assert controller.snapshot().engines == []


def test_duplicate_engine_name(hp: HostPool, shm_name: str, controller: Controller) -> None:
    other = make_pool(4, start_thread=False)
    try:
        with attach(hp, shm_name, "same"):
            with pytest.raises(DuplicateName):
                attach(other, shm_name, "same")
            assert [e.name for e in controller.snapshot().engines] == ["same"]
            alloc_pages(other, 1)  # the refused pool is not attached to any ledger
            assert _gpu_mapped(controller) == 0
    finally:
        other.close()


def test_watcher_records_a_failing_limit(
    hp: HostPool, shm_name: str, controller: Controller, monkeypatch: pytest.MonkeyPatch
) -> None:
    with attach(hp, shm_name, "w") as handle:

        def refuse(limit_bytes: int | None) -> bool:
            raise RuntimeError("refused")

        monkeypatch.setattr(hp.pool, "set_limit_bytes", refuse)
        revision = controller.set_limit("w", PAGE_BYTES)
        assert not controller.wait_applied("w", revision, timeout_s=0.2)
        assert controller.snapshot().engine("w").watch_error
        assert isinstance(handle.error, RuntimeError)


def test_sleep_state_is_published(hp: HostPool, shm_name: str, controller: Controller) -> None:
    with attach(hp, shm_name, "s") as handle:
        handle.set_sleeping(True)
        assert controller.snapshot().engine("s").state == EngineState.SLEEPING
        handle.set_sleeping(False)
        assert controller.snapshot().engine("s").state == EngineState.RUNNING


def test_heartbeat_and_stats_follow_the_pool(hp: HostPool, shm_name: str, controller: Controller) -> None:
    with attach(hp, shm_name, "h"):
        alloc_pages(hp, 2)
        time.sleep(0.1)
        info = controller.snapshot().engine("h")
        assert info.used_bytes == 2 * PAGE_BYTES and info.num_allocs == 1 and info.num_maps == 2
        assert info.num_sync_maps == hp.pool.stats().num_sync_maps == 1  # nothing was mapped ahead: one call
        assert info.heartbeat_age_s < 0.1


def test_atexit_releases_the_slot_of_a_clean_exit(shm_name: str) -> None:
    ctx = mp.get_context("spawn")
    child = ctx.Process(target=_attach_and_return, args=(shm_name,))
    child.start()
    child.join(30)
    assert child.exitcode == 0
    with Controller.open(shm_name) as ctl:
        assert all(slot.state == SlotState.FREE for slot in ctl.segment.slots)  # nobody had to reclaim
        assert ctl.segment.gpus[0].mapped_bytes == 0


def _attach_and_return(shm_name: str) -> None:
    hp = make_pool(4, start_thread=False)
    attach(hp, shm_name, "leaves")
    alloc_pages(hp, 2)


def test_a_real_kvpool_attaches_with_its_own_arena_and_backend(shm_name: str, controller: Controller) -> None:
    torch = pytest.importorskip("torch")
    from kvcached.pool import KVPool

    pool = KVPool(2, "vllm_flash", 16, 2, 64, torch.float16, "host", virtual_bytes=64 * 2**20, start_thread=False)
    try:
        with attach_engine(pool, "kv", "tiny", "vllm", shm_name, limit_bytes=None, headroom_bytes=0):
            ids = pool.alloc(pool.blocks_per_page * 3)
            assert ids is not None
            pool.kv_tensors[0][:, ids[0]] = 1.0  # the blocks are real memory
            info = controller.snapshot().engine("kv")
            assert info.kind == EngineKind.VLLM and info.gpu_uuid == pool.backend.uuid
            assert info.mapped_bytes == pool.arena.mapped_bytes == controller.snapshot().gpus[0].mapped_bytes > 0
            pool.free(ids)
            assert controller.wait_applied("kv", controller.set_limit("kv", 0))
            assert pool.arena.mapped_bytes == controller.snapshot().gpus[0].mapped_bytes
            assert pool.arena.mapped_bytes <= pool.group_bytes  # only the pinned page group stays
    finally:
        pool.close()


def test_budget_room_is_what_the_budget_still_admits(shm_name: str, controller: Controller) -> None:
    a, b = make_pool(8, start_thread=False), make_pool(8, start_thread=False)
    try:
        with attach(a, shm_name, "a") as ha, attach(b, shm_name, "b") as hb:
            assert ha.budget_room_bytes() is None  # no budget yet
            controller.set_budget(0, 5 * PAGE_BYTES)
            alloc_pages(a, 2)
            alloc_pages(b, 1)
            assert ha.budget_room_bytes() == hb.budget_room_bytes() == 2 * PAGE_BYTES
            controller.set_budget(0, 2 * PAGE_BYTES)  # below what is mapped: no room, not negative
            assert ha.budget_room_bytes() == 0
        assert ha.budget_room_bytes() is None  # closed
    finally:
        a.close()
        b.close()

def test_an_engine_is_held_to_its_share_while_a_peer_is_refused(shm_name: str, controller: Controller) -> None:
    a, b = make_pool(8, start_thread=False), make_pool(8, start_thread=False)
    shares: list[int | None] = []
    a.pool.set_share_bytes = shares.append  # type: ignore[attr-defined]
    try:
        with attach(a, shm_name, "a"), attach(b, shm_name, "b"):
            time.sleep(0.1)
            assert shares == []  # no budget, no contention: nothing said
            controller.set_budget(0, 4 * PAGE_BYTES)
            alloc_pages(a, 4)
            assert alloc_pages(b, 1) == []  # B is refused: the budget is full
            start = time.monotonic()
            while not shares:
                assert time.monotonic() - start < 0.2, "A was not told its share within 200 ms"
                time.sleep(0.005)
            assert shares == [2 * PAGE_BYTES]  # half the budget: two awake engines of weight 1
            time.sleep(0.05)  # a watcher round publishes it
            from kvctl.listing import engine_state

            assert engine_state(controller.snapshot().engine("a")) == "running,at-share"
            assert not controller.snapshot().engine("b").at_share
            while shares[-1] is not None:
                assert time.monotonic() - start < 2.0, "the share outlived the contention"
                time.sleep(0.02)
            assert time.monotonic() - start >= 0.9  # held for about a second after the last refusal
    finally:
        a.close()
        b.close()

def test_a_refused_engine_makes_the_others_give_back_their_reserve(shm_name: str, controller: Controller) -> None:
    a, b = make_pool(8, start_thread=False), make_pool(8, start_thread=False)
    trims: list[int] = []
    real_trim = a.pool.trim_reserve

    def trim_reserve() -> int:
        trims.append(real_trim())
        return trims[-1]

    a.pool.trim_reserve = trim_reserve
    try:
        with attach(a, shm_name, "a"), attach(b, shm_name, "b"):
            controller.set_budget(0, 4 * PAGE_BYTES)
            held = alloc_pages(a, 4)
            a.pool.free(held[:BLOCKS_PER_PAGE])  # one empty page stays mapped in A's reserve
            assert a.pool.stats().reserve_bytes == PAGE_BYTES
            start = time.monotonic()
            while not alloc_pages(b, 1):
                assert time.monotonic() - start < 0.1, "B still refused after 100 ms"
                time.sleep(0.001)
            # A's watcher thread records the trim after its unmap returns; B can be served
            # in between, so wait for the record rather than race it.
            while not trims:
                assert time.monotonic() - start < 1.0, "B was served but A never trimmed"
                time.sleep(0.001)
            assert trims == [1] and controller.snapshot().gpus[0].mapped_bytes == 4 * PAGE_BYTES
    finally:
        a.close()
        b.close()


def test_a_bad_limit_in_the_environment_is_named(
    hp: HostPool, shm_name: str, controller: Controller, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KVCACHED_LIMIT", "lots")
    with pytest.raises(InvalidValue, match="KVCACHED_LIMIT='lots'"):
        attach(hp, shm_name, "e", limit_bytes=FROM_ENV)
    assert controller.snapshot().engines == []
