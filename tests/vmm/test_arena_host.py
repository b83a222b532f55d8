"""The arena on the host backend: real OS virtual memory, observable effects only."""

from __future__ import annotations

import ctypes
import threading

import psutil
import pytest

from kvcached import _vmm

MiB = 1 << 20
PAGE = 2 * MiB


def write(addr: int, data: bytes) -> None:
    ctypes.memmove(addr, data, len(data))


def read(addr: int, n: int) -> bytes:
    return ctypes.string_at(addr, n)


def shared_resident_bytes() -> int:
    # memfd pages mapped into this process count as resident shared memory.
    return psutil.Process().memory_info().shared


@pytest.fixture
def backend() -> _vmm.HostBackend:
    return _vmm.HostBackend(64 * MiB)


def state(arena: _vmm.Arena, backend: _vmm.HostBackend) -> tuple:
    return (arena.mapped_pages(), arena.mapped_bytes, backend.created_bytes)


def test_map_creates_memory_and_unmap_gives_it_back(backend):
    arena = _vmm.Arena(backend, num_ranges=3, range_bytes=8 * PAGE, page_bytes=PAGE)
    assert arena.num_pages == 8 and arena.group_bytes == 3 * PAGE
    arena.map([1, 2, 5])
    assert arena.mapped_pages() == [1, 2, 5]
    assert arena.mapped_bytes == 9 * PAGE == backend.created_bytes
    arena.unmap([2])
    assert arena.mapped_pages() == [1, 5]
    assert backend.created_bytes == 6 * PAGE
    arena.close()
    assert backend.created_bytes == 0 and arena.closed


@pytest.mark.parametrize("mode", ["group", "per_range"])
def test_page_group_spans_every_range_and_data_survives_remaps(backend, mode):
    arena = _vmm.Arena(backend, num_ranges=4, range_bytes=4 * PAGE, page_bytes=PAGE, handle_mode=mode)
    arena.map([0, 1, 2, 3])
    for r in range(4):
        for p in range(4):
            write(arena.range_addr(r) + p * PAGE + 123, f"r{r}p{p}".encode())
    for _ in range(3):
        arena.unmap([0, 2])
        arena.map([2, 0])
        for r in range(4):
            write(arena.range_addr(r) + 2 * PAGE, b"fresh")
    for r in range(4):
        for p in (1, 3):
            assert read(arena.range_addr(r) + p * PAGE + 123, 4) == f"r{r}p{p}".encode()
        # A remapped page is new memory: it does not keep old contents.
        assert read(arena.range_addr(r) + 0 * PAGE + 123, 4) == b"\0\0\0\0"
    arena.close()


def test_unmap_really_returns_resident_memory(backend):
    arena = _vmm.Arena(backend, num_ranges=1, range_bytes=16 * PAGE, page_bytes=PAGE)
    before = shared_resident_bytes()
    arena.map(list(range(16)))
    ctypes.memset(arena.base_addr, 0x5A, 16 * PAGE)
    touched = shared_resident_bytes()
    assert touched - before >= 15 * PAGE
    arena.unmap(list(range(16)))
    assert touched - shared_resident_bytes() >= 15 * PAGE
    arena.close()


def test_out_of_memory_at_the_cap_is_specific_and_rolls_back(backend):
    arena = _vmm.Arena(backend, num_ranges=2, range_bytes=32 * PAGE, page_bytes=PAGE)
    arena.map(list(range(10)))  # 40 MiB of the 64 MiB cap
    before = state(arena, backend)
    with pytest.raises(_vmm.OutOfMemoryError, match="cap"):
        arena.map(list(range(10, 20)))  # would need 40 MiB more
    assert state(arena, backend) == before
    assert isinstance(_vmm.OutOfMemoryError("x"), MemoryError)
    arena.map(list(range(10, 16)))  # exactly the rest fits
    assert backend.created_bytes == 64 * MiB
    arena.close()


@pytest.mark.parametrize(
    ("ids", "message"),
    [
        ([8], r"out of range: \[8\] \(allowed 0..7\)"),
        ([-1, 2], r"out of range: \[-1\]"),
        ([3, 3], r"repeated in one call: \[3\]"),
        ([1], r"already mapped: \[1\]"),
    ],
)
def test_bad_map_ids_raise_value_error_and_change_nothing(backend, ids, message):
    arena = _vmm.Arena(backend, num_ranges=2, range_bytes=8 * PAGE, page_bytes=PAGE)
    arena.map([1])
    before = state(arena, backend)
    with pytest.raises(ValueError, match=message):
        arena.map(ids)
    assert state(arena, backend) == before
    arena.close()


@pytest.mark.parametrize(("ids", "message"), [([2], r"not mapped: \[2\]"), ([9], "out of range"), ([1, 1], "repeated")])
def test_bad_unmap_ids_raise_value_error_and_change_nothing(backend, ids, message):
    arena = _vmm.Arena(backend, num_ranges=2, range_bytes=8 * PAGE, page_bytes=PAGE)
    arena.map([1])
    before = state(arena, backend)
    with pytest.raises(ValueError, match=message):
        arena.unmap(ids)
    assert state(arena, backend) == before
    arena.close()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_ranges": 0, "range_bytes": PAGE, "page_bytes": PAGE}, "num_ranges must be > 0"),
        ({"num_ranges": 1, "range_bytes": PAGE, "page_bytes": 3 * MiB}, "multiple of the granularity"),
        ({"num_ranges": 1, "range_bytes": PAGE, "page_bytes": 0}, "page_bytes must be a positive multiple"),
        ({"num_ranges": 1, "range_bytes": 3 * MiB, "page_bytes": PAGE}, "range_bytes must be a positive multiple"),
        ({"num_ranges": 1, "range_bytes": 0, "page_bytes": PAGE}, "range_bytes must be a positive multiple"),
        ({"num_ranges": 1, "range_bytes": PAGE, "page_bytes": PAGE, "handle_mode": "x"}, "handle_mode must be"),
    ],
)
def test_bad_geometry_is_a_value_error(backend, kwargs, message):
    with pytest.raises(ValueError, match=message):
        _vmm.Arena(backend, **kwargs)
    assert backend.created_bytes == 0


def test_negative_sizes_are_rejected_before_reaching_cpp(backend):
    with pytest.raises(TypeError):
        _vmm.Arena(backend, num_ranges=-1, range_bytes=PAGE, page_bytes=PAGE)
    with pytest.raises(ValueError, match="granularity"):
        _vmm.HostBackend(MiB, granularity=1000)


def test_threads_mapping_concurrently_keep_exact_accounting(backend):
    arena = _vmm.Arena(backend, num_ranges=2, range_bytes=16 * PAGE, page_bytes=PAGE)
    errors: list[BaseException] = []

    def churn(pages: list[int]) -> None:
        try:
            for i in range(30):
                arena.map(pages)
                for p in pages:
                    write(arena.range_addr(1) + p * PAGE, bytes([i % 250 + 1]) * 8)
                    assert read(arena.range_addr(1) + p * PAGE, 8) == bytes([i % 250 + 1]) * 8
                arena.unmap(pages)
        except BaseException as exc:  # surfaced below through `errors`
            errors.append(exc)

    threads = [threading.Thread(target=churn, args=([2 * t, 2 * t + 1],)) for t in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert arena.mapped_pages() == [] and backend.created_bytes == 0
    arena.close()


def test_ledger_counts_admits_and_refuses_over_budget(backend):
    words = (ctypes.c_uint64 * 4)()
    slot, gpu, budget = (ctypes.addressof(words) + 8 * i for i in range(3))
    words[2] = 5 * PAGE  # budget: two page groups of 2 ranges and a bit
    arena = _vmm.Arena(backend, num_ranges=2, range_bytes=8 * PAGE, page_bytes=PAGE)
    arena.map([0])
    arena.set_ledger(slot, gpu, budget, 0)
    assert (words[0], words[1]) == (2 * PAGE, 2 * PAGE)  # bytes already mapped move in
    arena.map([1])
    assert (words[0], words[1]) == (4 * PAGE, 4 * PAGE)
    with pytest.raises(_vmm.OutOfMemoryError, match="budget"):
        arena.map([2])
    assert (words[0], words[1]) == (4 * PAGE, 4 * PAGE) and arena.mapped_pages() == [0, 1]
    words[2] = 2**64 - 1  # no budget
    arena.map([2, 3])
    arena.unmap([0])
    assert (words[0], words[1]) == (6 * PAGE, 6 * PAGE)
    arena.clear_ledger()
    assert (words[0], words[1]) == (0, 0)
    arena.close()


def test_headroom_refuses_maps_that_leave_too_little_free(backend):
    words = (ctypes.c_uint64 * 3)()
    words[2] = 2**64 - 1
    arena = _vmm.Arena(backend, num_ranges=1, range_bytes=32 * PAGE, page_bytes=PAGE)
    base = ctypes.addressof(words)
    arena.set_ledger(base, base + 8, base + 16, 60 * MiB)  # cap is 64 MiB: two pages fit
    arena.map([0, 1])
    with pytest.raises(_vmm.OutOfMemoryError, match="headroom"):
        arena.map([2])
    assert words[1] == 2 * PAGE and arena.mapped_pages() == [0, 1]
    arena.close()
    assert words[0] == words[1] == 0


def test_atomics_on_shared_words():
    words = (ctypes.c_uint64 * 2)()
    addr = ctypes.addressof(words)
    assert _vmm.atomic_fetch_add_u64(addr, 10) == 0
    assert _vmm.atomic_fetch_add_u64(addr, -3) == 10
    assert _vmm.atomic_load_u64(addr) == 7
    assert _vmm.atomic_cas_u64(addr, 7, 9) and not _vmm.atomic_cas_u64(addr, 7, 1)
    _vmm.atomic_store_u64(addr + 8, 2**64 - 1)
    assert words[1] == 2**64 - 1
    with pytest.raises(ValueError, match="aligned"):
        _vmm.atomic_load_u64(addr + 4)


def test_closed_arena_refuses_work(backend):
    arena = _vmm.Arena(backend, num_ranges=1, range_bytes=2 * PAGE, page_bytes=PAGE)
    arena.map([0])
    arena.close()
    assert backend.created_bytes == 0
    with pytest.raises(_vmm.VmmError, match="closed"):
        arena.map([1])


def test_backend_status_names_both_backends():
    status = _vmm.backend_status()
    assert status["host"] == "ok"
    assert status.get("cuda")


def test_auto_handle_mode_is_group_on_the_host(backend):
    arena = _vmm.Arena(backend, num_ranges=3, range_bytes=2 * PAGE, page_bytes=PAGE)
    assert arena.handle_mode == "group"
    assert _vmm.Arena(backend, 3, 2 * PAGE, PAGE, "per_range").handle_mode == "per_range"
