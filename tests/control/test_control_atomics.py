"""The reclaimer's atomic subtraction, through libatomic and through the core's fallback."""

from __future__ import annotations

import ctypes
import threading

import pytest

from kvcached.control import atomics


@pytest.fixture(params=["libatomic", "vmm"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr(atomics, "_fetch_add", None)
    monkeypatch.setattr(atomics, "_fence", None)
    if request.param == "vmm":
        pytest.importorskip("kvcached._vmm")

        def no_libatomic(name: str) -> ctypes.CDLL:
            raise OSError(f"{name}: not found")

        monkeypatch.setattr(atomics.ctypes, "CDLL", no_libatomic)
    return str(request.param)


def test_fetch_add_wraps_and_returns_the_old_value(backend: str) -> None:
    word = ctypes.c_uint64(10)
    assert atomics.fetch_add_u64(ctypes.addressof(word), -4) == 10
    assert word.value == 6
    assert atomics.fetch_add_u64(ctypes.addressof(word), -7) == 6
    assert word.value == (1 << 64) - 1
    atomics.fence()


def test_no_update_is_lost_between_threads(backend: str) -> None:
    word = ctypes.c_uint64(0)
    addr = ctypes.addressof(word)

    def work(delta: int) -> None:
        for _ in range(20000):
            atomics.fetch_add_u64(addr, delta)

    threads = [threading.Thread(target=work, args=(d,)) for d in (3, -1, 5, -2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert word.value == 20000 * (3 - 1 + 5 - 2)
