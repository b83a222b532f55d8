"""Slots: claiming, names, a full table, release, reclaiming the dead, seqlocked reads."""

from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys
import threading

import pytest

from kvcached.control import (
    ControlError,
    Controller,
    DuplicateName,
    EngineKind,
    EngineState,
    GpuTableFull,
    InvalidValue,
    SlotTableFull,
    UnknownEngine,
    registry,
)
from kvcached.control.segment import Segment


def _claim(seg: Segment, name: str, gpu: int = 0) -> tuple[int, int]:
    return registry.claim_slot(seg, name, "model", EngineKind.OTHER, gpu, None, 1.0, 0)


def _dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _pretend_owner(seg: Segment, index: int, pid: int, ticks: int) -> None:
    slot = seg.slots[index]
    with registry.engine_write(slot):
        slot.pid, slot.start_ticks = pid, ticks


@pytest.fixture
def seg(shm_name: str) -> Segment:
    s = Segment.open(shm_name, create=True, num_gpus=2, num_slots=4)
    registry.find_or_create_gpu(s, "GPU-a", 1 << 30, 0)
    yield s  # type: ignore[misc]
    s.close()


def test_gpu_entries_are_found_by_uuid(seg: Segment) -> None:
    assert registry.find_or_create_gpu(seg, "GPU-a", 5, 5) == 0  # existing: unchanged
    assert seg.gpus[0].total_bytes == 1 << 30
    assert registry.find_or_create_gpu(seg, "GPU-b", 2 << 30, 0) == 1
    generation = seg.header.generation
    with pytest.raises(GpuTableFull):
        registry.find_or_create_gpu(seg, "GPU-c", 1, 0)
    with pytest.raises(InvalidValue):
        registry.find_or_create_gpu(seg, "", 1, 0)
    assert seg.header.generation == generation


def test_claim_until_full_then_release(seg: Segment) -> None:
    claims = [_claim(seg, f"e{i}") for i in range(4)]
    assert [index for index, _ in claims] == [0, 1, 2, 3]
    before = bytes(seg.slots[0]) + bytes(seg.slots[3])
    with pytest.raises(SlotTableFull, match="all 4 engine slots"):
        _claim(seg, "e4")
    assert bytes(seg.slots[0]) + bytes(seg.slots[3]) == before
    assert registry.release_slot(seg, *claims[2])
    assert not registry.release_slot(seg, *claims[2])  # twice: no longer ours
    assert _claim(seg, "e4")[0] == 2


def test_duplicate_name(seg: Segment) -> None:
    _claim(seg, "llama")
    before = bytes(seg.slots[1])
    with pytest.raises(DuplicateName, match="'llama'"):
        _claim(seg, "llama")
    assert bytes(seg.slots[1]) == before


@pytest.mark.parametrize("name", ["", "-x", "has space", "x" * 64, "tab\t", "naïve"])
def test_bad_names(seg: Segment, name: str) -> None:
    with pytest.raises(InvalidValue):
        _claim(seg, name)
    assert all(slot.state == EngineState.FREE for slot in seg.slots)


@pytest.mark.parametrize(("model", "name"), [
    ("/tmp/llama8b", "tmp/llama8b"), ("meta-llama/Llama-3.1-8B", "meta-llama/Llama-3.1-8B"), ("./m", "m"),
    ("my model", "my-model"), ("naïve", "na-ve"), ("/", "dflt"), ("/" + "a" * 100, "a" * 63),
])
def test_a_served_models_path_makes_a_name_the_registry_takes(seg: Segment, model: str, name: str) -> None:
    from kvcached.control import registry

    assert registry.name_from_model(model, "dflt") == name
    _claim(seg, name)  # accepted


def test_dead_slot_is_reclaimed_and_its_bytes_return(seg: Segment) -> None:
    live, _ = _claim(seg, "live")
    dead, _ = _claim(seg, "dead")
    seg.gpus[0].mapped_bytes = 10 << 20
    seg.slots[live].mapped_bytes, seg.slots[dead].mapped_bytes = 4 << 20, 6 << 20
    _pretend_owner(seg, dead, _dead_pid(), seg.slots[dead].start_ticks)
    with Controller(seg) as ctl:
        snap = ctl.snapshot()  # a reader reclaims
        assert [e.name for e in snap.engines] == ["live"]
        assert snap.gpus[0].mapped_bytes == 4 << 20
        assert seg.slots[dead].state == EngineState.FREE and seg.slots[dead].mapped_bytes == 0
        assert ctl.reclaim_dead() == []


def test_reused_pid_is_not_the_same_process(seg: Segment) -> None:
    index, _ = _claim(seg, "old")
    _pretend_owner(seg, index, os.getpid(), seg.slots[index].start_ticks - 1)  # our pid, another start time
    assert registry.reclaim_dead(seg) == ["old"]
    _claim(seg, "old")  # the name is free again


def test_a_slot_left_by_a_killed_process(shm_name: str) -> None:
    ctx = mp.get_context("spawn")
    child = ctx.Process(target=_claim_and_die, args=(shm_name,))
    child.start()
    child.join(30)
    assert child.exitcode == 0
    with Controller.open(shm_name) as ctl:
        assert ctl.segment.slots[0].state == EngineState.CLAIMING
        assert ctl.reclaim_dead() == ["orphan"]
        assert ctl.snapshot().engines == []


def _claim_and_die(name: str) -> None:
    seg = Segment.open(name, create=True)
    registry.find_or_create_gpu(seg, "GPU-a", 1 << 30, 0)
    _claim(seg, "orphan")
    os._exit(0)  # no cleanup, as after SIGKILL


def test_find_engine(seg: Segment) -> None:
    _claim(seg, "a")
    assert registry.find_engine(seg, "a") == 0
    with pytest.raises(UnknownEngine):
        registry.find_engine(seg, "b")


def test_read_slot_is_never_torn(seg: Segment) -> None:
    index, _ = _claim(seg, "w")
    slot = seg.slots[index]
    stop = threading.Event()

    def writer() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            with registry.engine_write(slot):
                slot.used_bytes = i
                slot.cached_bytes = i
                slot.demand_bytes = i

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        for _ in range(3000):
            copy = registry.read_slot(seg, index)
            assert copy.used_bytes == copy.cached_bytes == copy.demand_bytes
    finally:
        stop.set()
        thread.join()


def test_read_slot_gives_up_on_a_writer_stuck_mid_write(seg: Segment, monkeypatch: pytest.MonkeyPatch) -> None:
    index, _ = _claim(seg, "stuck")
    monkeypatch.setattr(registry, "_READ_TIMEOUT_S", 0.02)
    seg.slots[index].seq += 1
    with pytest.raises(ControlError, match="mid-write"):
        registry.read_slot(seg, index)


def test_read_control_skips_a_controller_mid_write(seg: Segment) -> None:
    index, _ = _claim(seg, "c")
    slot = seg.slots[index]
    assert registry.read_control(slot) == (slot.limit_bytes, 1)
    slot.ctl_seq += 1
    assert registry.read_control(slot) is None
