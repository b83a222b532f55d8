"""The one read-modify-write the Python side needs on words the core updates.

Python has no atomics. The reclaimer subtracts a dead engine's bytes from its GPU's
``mapped_bytes`` while live engines add to the same word from C++, so a plain
read-then-write could lose their updates. We call libatomic's ``__atomic_fetch_add_8``
(``lock xadd`` on x86-64) through ctypes, and ``kvcached._vmm.atomic_fetch_add_u64`` where
libatomic is missing. Loaded on first use, so ``import kvcached.control`` stays light.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable

__all__ = ["fence", "fetch_add_u64"]

_SEQ_CST = 5
_MASK = (1 << 64) - 1

_fetch_add: Callable[[int, int], int] | None = None
_fence: Callable[[], None] | None = None
# x86-64 keeps stores in order and loads in order (TSO), which is all a seqlock needs from
# the interpreter's plain stores; weaker CPUs need a real fence between them.
_NEEDS_FENCE = os.uname().machine not in ("x86_64", "i686")


def _load() -> None:
    global _fetch_add, _fence
    try:
        lib = ctypes.CDLL("libatomic.so.1")
    except OSError:
        lib = None
    if lib is not None:
        add = lib.__atomic_fetch_add_8
        add.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int]
        add.restype = ctypes.c_uint64
        thread_fence = lib.atomic_thread_fence
        thread_fence.argtypes = [ctypes.c_int]
        thread_fence.restype = None
        _fetch_add = lambda addr, delta: int(add(addr, delta & _MASK, _SEQ_CST))  # noqa: E731
        _fence = lambda: thread_fence(_SEQ_CST)  # noqa: E731
        return
    try:
        from kvcached import _vmm

        vmm_add = _vmm.atomic_fetch_add_u64
    except (ImportError, AttributeError):
        raise RuntimeError(
            "kvcached needs libatomic.so.1 (package libatomic1) or kvcached._vmm.atomic_fetch_add_u64 "
            "for atomic updates of the control segment"
        ) from None
    _fetch_add = lambda addr, delta: int(vmm_add(addr, delta))  # noqa: E731 - it takes a signed int64
    _fence = lambda: None  # noqa: E731


def fetch_add_u64(addr: int, delta: int) -> int:
    """Atomically add ``delta`` (may be negative, wraps mod 2**64) to the uint64 at ``addr``.

    Returns the previous value. ``addr`` must be 8-byte aligned and stay mapped during the call.
    """
    if _fetch_add is None:
        _load()
    assert _fetch_add is not None
    return _fetch_add(addr, delta)


def fence() -> None:
    """Full memory fence where the CPU needs one for seqlocks; a no-op on x86-64."""
    if not _NEEDS_FENCE:
        return
    if _fence is None:
        _load()
    assert _fence is not None
    _fence()
