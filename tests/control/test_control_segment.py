"""Opening the segment: creation, races, locking, and one clear error per bad segment."""

from __future__ import annotations

import multiprocessing as mp
import os
import stat
import threading
import time
from pathlib import Path

import posix_ipc
import pytest

from kvcached.control import (
    ControlError,
    InvalidValue,
    SegmentCorrupt,
    SegmentMissing,
    SegmentPermissionError,
    SegmentVersionError,
    layout,
    segment,
)
from kvcached.control.layout import Header
from kvcached.control.segment import Segment


def _path(name: str) -> Path:
    return Path("/dev/shm") / name


def _poke(name: str, offset: int, raw: bytes) -> None:
    fd = os.open(_path(name), os.O_RDWR)
    try:
        os.pwrite(fd, raw, offset)
    finally:
        os.close(fd)


def _open_error(name: str, create: bool = False) -> Exception:
    """The error opening ``name`` raises: one line, naming the segment, changing nothing."""
    before = _path(name).read_bytes()
    with pytest.raises(ControlError) as info:
        Segment.open(name, create=create).close()
    assert _path(name).read_bytes() == before
    message = str(info.value)
    assert "\n" not in message and name in message
    return info.value


def _make(name: str, **kwargs: int) -> None:
    Segment.open(name, create=True, **kwargs).close()


def test_create_then_open_sees_the_same_segment(shm_name: str) -> None:
    with Segment.open(shm_name, create=True, num_gpus=3, num_slots=5) as first, Segment.open(shm_name) as second:
        assert (len(second.gpus), len(second.slots)) == (3, 5)
        assert first.header.creation_id == second.header.creation_id
        first.slots[4].used_bytes = 77
        assert second.slots[4].used_bytes == 77  # one memory, two mappings
    st = os.stat(_path(shm_name))
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.geteuid()
    assert st.st_size == layout.segment_bytes(3, 5)


def test_concurrent_creators_agree_on_one_segment(shm_name: str) -> None:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_create_and_report, args=(shm_name, results)) for _ in range(4)]
    for p in procs:
        p.start()
    ids = {results.get(timeout=30) for _ in procs}
    for p in procs:
        p.join(30)
    assert len(ids) == 1 and 0 not in ids


def _create_and_report(name: str, results: mp.Queue) -> None:  # type: ignore[type-arg]
    with Segment.open(name, create=True) as seg:
        results.put(seg.header.creation_id)


def test_missing_segment(shm_name: str) -> None:
    with pytest.raises(SegmentMissing, match=shm_name):
        Segment.open(shm_name)
    assert not _path(shm_name).exists()


@pytest.mark.parametrize("name", ["", "a/b", "x" * 201, "sp ace", "../etc"])
def test_bad_names(name: str) -> None:
    with pytest.raises(InvalidValue):
        Segment.open(name, create=True)


def test_bad_table_sizes(shm_name: str) -> None:
    with pytest.raises(InvalidValue):
        Segment.open(shm_name, create=True, num_slots=0)
    assert not _path(shm_name).exists()


def test_another_abi_version(shm_name: str) -> None:
    _make(shm_name)
    _poke(shm_name, Header.abi_version.offset, (layout.ABI_VERSION + 1).to_bytes(4, "little"))  # type: ignore[attr-defined]
    err = _open_error(shm_name, create=True)
    assert isinstance(err, SegmentVersionError) and f"ABI version {layout.ABI_VERSION + 1}" in str(err)


def test_truncated(shm_name: str) -> None:
    _make(shm_name)
    os.truncate(_path(shm_name), layout.segment_bytes(segment.DEFAULT_NUM_GPUS, 1))
    assert isinstance(_open_error(shm_name), SegmentCorrupt)
    os.truncate(_path(shm_name), 100)  # not even a header
    err = _open_error(shm_name, create=True)
    assert isinstance(err, SegmentCorrupt) and "truncated" in str(err)


def test_not_a_kvcached_segment(shm_name: str) -> None:
    _make(shm_name)
    _poke(shm_name, 0, b"GARBAGE!")
    err = _open_error(shm_name, create=True)
    assert isinstance(err, SegmentCorrupt) and "not a kvcached segment" in str(err)


@pytest.mark.parametrize("field", ["num_slots", "total_bytes", "slot_bytes", "owner_uid"])
def test_corrupt_header_field(shm_name: str, field: str) -> None:
    _make(shm_name)
    _poke(shm_name, getattr(Header, field).offset, b"\x07")
    err = _open_error(shm_name)
    assert isinstance(err, SegmentCorrupt) and "checksum" in str(err)


def test_header_that_lies_consistently(shm_name: str) -> None:
    # Right checksum, impossible sizes: a writer from a buggy build, not bit rot.
    _make(shm_name, num_slots=2)
    raw = bytearray(_path(shm_name).read_bytes()[: layout.HEADER_BYTES])
    hdr = Header.from_buffer(raw)
    hdr.total_bytes += 8
    hdr.checksum = layout.header_checksum(bytes(raw))
    del hdr
    _poke(shm_name, 0, bytes(raw))
    err = _open_error(shm_name)
    assert isinstance(err, SegmentCorrupt) and "declares" in str(err)


def test_open_to_others(shm_name: str) -> None:
    _make(shm_name)
    os.chmod(_path(shm_name), 0o644)
    err = _open_error(shm_name, create=True)
    assert isinstance(err, SegmentPermissionError) and "0644" in str(err)


@pytest.mark.skipif(os.geteuid() != 0, reason="making a segment owned by another uid needs root")
def test_another_users_segment(shm_name: str) -> None:
    _make(shm_name)
    os.chown(_path(shm_name), 4242, 4242)
    err = _open_error(shm_name, create=True)
    assert isinstance(err, SegmentPermissionError) and "uid 4242" in str(err)


def test_never_initialized(shm_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # What a creator that died between creating and initializing leaves behind.
    posix_ipc.SharedMemory("/" + shm_name, posix_ipc.O_CREX, mode=0o600).close_fd()
    monkeypatch.setattr(segment, "_INIT_WAIT_S", 0.05)
    err = _open_error(shm_name)
    assert isinstance(err, SegmentCorrupt) and "never initialized" in str(err)
    with Segment.open(shm_name, create=True) as seg:  # a creator finishes the job
        assert seg.header.magic == layout.MAGIC


def test_reader_waits_for_a_creator_mid_initialization(shm_name: str) -> None:
    posix_ipc.SharedMemory("/" + shm_name, posix_ipc.O_CREX, mode=0o600).close_fd()
    opened: list[int] = []
    reader = threading.Thread(target=lambda: opened.append(Segment.open(shm_name).header.num_slots))
    reader.start()
    time.sleep(0.05)
    _make(shm_name, num_slots=7)
    reader.join(5)
    assert opened == [7]


def test_lock_excludes_other_mappings_and_reenters(shm_name: str) -> None:
    with Segment.open(shm_name, create=True) as a, Segment.open(shm_name) as b:
        order: list[str] = []

        def other() -> None:
            with b.lock():
                order.append("b")

        with a.lock(), a.lock():  # re-entrant in one thread
            thread = threading.Thread(target=other)
            thread.start()
            time.sleep(0.05)
            order.append("a")
        thread.join(5)
        assert order == ["a", "b"]


def test_lock_repairs_a_controller_that_died_mid_write(shm_name: str) -> None:
    with Segment.open(shm_name, create=True) as seg:
        seg.slots[3].ctl_seq = 5  # odd: a writer never finished
        with seg.lock():
            assert seg.slots[3].ctl_seq == 6


def test_unlink(shm_name: str) -> None:
    _make(shm_name)
    assert Segment.unlink(shm_name) is True
    assert Segment.unlink(shm_name) is False
