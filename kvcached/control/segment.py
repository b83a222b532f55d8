"""Open, create and validate the control segment; its lock; addresses of its words.

One POSIX shared-memory object per host and user (``/dev/shm/<name>``, mode 0600).
Creation is race-free without a separate lock object: the segment file itself is the
lock (``flock`` on its descriptor, released by the kernel when a holder dies), and
whoever holds it and finds the segment uninitialized initializes it, publishing
``Header.magic`` last. Readers that find no magic wait briefly for the creator.

The lock guards slot claiming, GPU entry creation and controller writes. Nothing on an
engine's hot path takes it: engines write their own slot inside its seqlock, and the core
updates the mapped counters with atomics.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import mmap
import os
import re
import stat
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import posix_ipc

from kvcached.control import layout
from kvcached.control.errors import (
    ControlError,
    InvalidValue,
    SegmentCorrupt,
    SegmentMissing,
    SegmentPermissionError,
    SegmentVersionError,
)
from kvcached.control.layout import ABI_VERSION, MAGIC, NO_LIMIT, GpuEntry, Header, Slot

__all__ = ["DEFAULT_NUM_GPUS", "DEFAULT_NUM_SLOTS", "Segment", "default_name"]

DEFAULT_NUM_GPUS = 32  # GPU and MIG UUIDs on one host, plus the host backend's entry
DEFAULT_NUM_SLOTS = 64
_MAX_ENTRIES = 4096
_INIT_WAIT_S = 1.0
_LOCK_TIMEOUT_S = 10.0
_NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,200}$")


def default_name() -> str:
    """``KVCACHED_SHM_NAME`` if set, else ``kvcached-<uid>`` (one segment per host and user)."""
    from kvcached import envs

    return str(envs.get("KVCACHED_SHM_NAME")) or f"kvcached-{os.geteuid()}"


def _posix_name(name: str) -> str:
    if not _NAME_RE.match(name):
        raise InvalidValue(f"bad segment name {name!r}: use 1-200 of A-Z a-z 0-9 . _ -")
    return "/" + name


class Segment:
    """A mapped, validated control segment.

    Thread safety: the views may be read from any thread; :meth:`lock` serializes writers
    across threads and processes. Keep the object alive while any arena holds addresses
    of its words (``EngineHandle`` does).
    """

    def __init__(self, name: str, fd: int, mm: mmap.mmap) -> None:
        self.name = name
        self._fd = fd
        self._mm: mmap.mmap | None = mm
        self._thread_lock = threading.Lock()
        self._lock_depth = 0
        self._lock_owner: int | None = None
        self.base_addr = ctypes.addressof(ctypes.c_char.from_buffer(mm))
        self.header = Header.from_buffer(mm, 0)
        num_gpus, num_slots = self.header.num_gpus, self.header.num_slots
        gpu_base = layout.HEADER_BYTES
        slot_base = gpu_base + num_gpus * layout.GPU_ENTRY_BYTES
        self.gpus = [GpuEntry.from_buffer(mm, gpu_base + i * layout.GPU_ENTRY_BYTES) for i in range(num_gpus)]
        self.slots = [Slot.from_buffer(mm, slot_base + i * layout.SLOT_BYTES) for i in range(num_slots)]

    # -- opening ---------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        name: str | None = None,
        create: bool = False,
        num_gpus: int = DEFAULT_NUM_GPUS,
        num_slots: int = DEFAULT_NUM_SLOTS,
    ) -> Segment:
        """Open (and with ``create``, create or finish initializing) the segment ``name``.

        Raises:
            SegmentMissing: it does not exist and ``create`` is false.
            SegmentPermissionError: another user's, or open to group/others.
            SegmentVersionError: made by another ABI version.
            SegmentCorrupt: truncated, never initialized, or a header that fails its checks.
            InvalidValue: a bad name or table size.
        """
        name = default_name() if name is None else name
        posix_name = _posix_name(name)
        if create and not (1 <= num_gpus <= _MAX_ENTRIES and 1 <= num_slots <= _MAX_ENTRIES):
            raise InvalidValue(f"table sizes must be 1..{_MAX_ENTRIES}: got {num_gpus} GPUs, {num_slots} slots")
        fd = _open_fd(posix_name, name, create)
        try:
            _check_owner(fd, name)
            mm = _map_initialized(fd, name, create, num_gpus, num_slots)
        except BaseException:
            os.close(fd)
            raise
        return cls(name, fd, mm)

    @staticmethod
    def unlink(name: str) -> bool:
        """Remove the segment's name; mappings stay valid until closed. False if it did not exist."""
        try:
            posix_ipc.unlink_shared_memory(_posix_name(name))
        except posix_ipc.ExistentialError:
            return False
        return True

    def close(self) -> None:
        """Unmap and close. Safe to call twice. Views handed out earlier become invalid."""
        if self._mm is None:
            return
        mm, self._mm = self._mm, None
        del self.header, self.gpus, self.slots
        # A caller may still hold a view: then the mapping goes when the last one is collected.
        with contextlib.suppress(BufferError):
            mm.close()
        os.close(self._fd)

    @property
    def closed(self) -> bool:
        return self._mm is None

    def __enter__(self) -> Segment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- locking ---------------------------------------------------------------------

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the segment's writer lock (re-entrant within a thread).

        Raises:
            ControlError: another process held it for longer than 10 s.
        """
        me = threading.get_ident()
        if self._lock_owner == me:
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
            return
        with self._thread_lock:
            _flock(self._fd, self.name)
            self._lock_owner, self._lock_depth = me, 1
            try:
                self._repair_torn_writes()
                yield
            finally:
                self._lock_owner, self._lock_depth = None, 0
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _repair_torn_writes(self) -> None:
        # A controller that died inside a control write left ctl_seq odd. The lock was
        # released by its death, so nobody else is writing: close the seqlock.
        for slot in self.slots:
            if slot.ctl_seq & 1:
                slot.ctl_seq += 1

    def bump_generation(self) -> None:
        """Mark that the tables or control fields changed (call under :meth:`lock`)."""
        self.header.generation += 1

    # -- addresses for the core ------------------------------------------------------

    def address_of(self, view: ctypes.Structure, field: str) -> int:
        """Integer address of ``field`` of a view into this segment (for ``Arena.set_ledger``)."""
        return ctypes.addressof(view) + getattr(type(view), field).offset

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{len(self.slots)} slots"
        return f"Segment({self.name!r}, {state})"


def _open_fd(posix_name: str, name: str, create: bool) -> int:
    shm = None
    try:
        if create:
            try:
                shm = posix_ipc.SharedMemory(posix_name, posix_ipc.O_CREX, mode=0o600)
            except posix_ipc.ExistentialError:
                shm = None
        if shm is None:
            shm = posix_ipc.SharedMemory(posix_name, 0)
    except posix_ipc.ExistentialError:
        raise SegmentMissing(f"no control segment {name!r} (no engine has registered on this host yet)") from None
    except posix_ipc.PermissionsError:
        raise SegmentPermissionError(f"control segment {name!r} is not ours to open (permission denied)") from None
    fd = os.dup(shm.fd)
    shm.close_fd()
    return fd


def _check_owner(fd: int, name: str) -> None:
    st = os.fstat(fd)
    if st.st_uid != os.geteuid():
        raise SegmentPermissionError(
            f"control segment {name!r} belongs to uid {st.st_uid}, not {os.geteuid()}; set KVCACHED_SHM_NAME"
        )
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise SegmentPermissionError(
            f"control segment {name!r} has mode {stat.S_IMODE(st.st_mode):04o}; it must be 0600"
        )


def _flock(fd: int, name: str) -> None:
    deadline = time.monotonic() + _LOCK_TIMEOUT_S
    delay_s = 0.0002
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):
                raise
        if time.monotonic() > deadline:
            raise ControlError(f"control segment {name!r}: lock held by another process for {_LOCK_TIMEOUT_S:.0f} s")
        time.sleep(delay_s)
        delay_s = min(delay_s * 2, 0.005)


def _map_initialized(fd: int, name: str, create: bool, num_gpus: int, num_slots: int) -> mmap.mmap:
    deadline = time.monotonic() + _INIT_WAIT_S
    while True:
        _flock(fd, name)
        try:
            size = os.fstat(fd).st_size
            magic = int.from_bytes(os.pread(fd, 8, 0), "little") if size >= 8 else 0
            if size == 0 or (size >= 8 and magic == 0):
                if create:
                    _initialize(fd, num_gpus, num_slots)
                    continue
            else:
                _check_header(fd, name, size)
                return mmap.mmap(fd, size)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
        if time.monotonic() > deadline:
            raise SegmentCorrupt(
                f"control segment {name!r} was never initialized (its creator died?); remove it and retry"
            )
        time.sleep(0.005)


def _initialize(fd: int, num_gpus: int, num_slots: int) -> None:
    total = layout.segment_bytes(num_gpus, num_slots)
    os.ftruncate(fd, 0)  # drop whatever a creator that died half-way left
    os.ftruncate(fd, total)
    with mmap.mmap(fd, total) as mm:
        hdr = Header.from_buffer(mm, 0)
        hdr.abi_version = ABI_VERSION
        hdr.header_bytes = layout.HEADER_BYTES
        hdr.gpu_entry_bytes = layout.GPU_ENTRY_BYTES
        hdr.slot_bytes = layout.SLOT_BYTES
        hdr.num_gpus, hdr.num_slots, hdr.total_bytes = num_gpus, num_slots, total
        hdr.owner_uid = os.geteuid()
        hdr.creation_id = int.from_bytes(os.urandom(8), "little")
        hdr.created_ns = time.time_ns()
        gpu_base = layout.HEADER_BYTES
        for i in range(num_gpus):
            gpu = GpuEntry.from_buffer(mm, gpu_base + i * layout.GPU_ENTRY_BYTES)
            gpu.index, gpu.budget_bytes = i, NO_LIMIT
            del gpu
        slot_base = gpu_base + num_gpus * layout.GPU_ENTRY_BYTES
        for i in range(num_slots):
            slot = Slot.from_buffer(mm, slot_base + i * layout.SLOT_BYTES)
            slot.gpu_index, slot.limit_bytes, slot.weight = -1, NO_LIMIT, 1.0
            del slot
        hdr.checksum = layout.header_checksum(bytes(mm[: layout.HEADER_BYTES]))
        hdr.magic = MAGIC  # published last: openers treat magic == 0 as "not ready"
        del hdr


def _check_header(fd: int, name: str, size: int) -> None:
    what = f"control segment {name!r}"
    if size < layout.HEADER_BYTES:
        raise SegmentCorrupt(f"{what} is truncated: {size} bytes, less than its {layout.HEADER_BYTES}-byte header")
    raw = os.pread(fd, layout.HEADER_BYTES, 0)
    hdr = Header.from_buffer_copy(raw)
    if hdr.magic != MAGIC:
        raise SegmentCorrupt(f"{what} is not a kvcached segment (magic {hdr.magic:#018x})")
    if hdr.abi_version != ABI_VERSION:
        raise SegmentVersionError(
            f"{what} has ABI version {hdr.abi_version}, this kvcached speaks {ABI_VERSION}: "
            "stop the engines of the other version or set KVCACHED_SHM_NAME"
        )
    if hdr.checksum != layout.header_checksum(raw):
        raise SegmentCorrupt(f"{what} has a corrupt header (checksum mismatch)")
    sizes = (hdr.header_bytes, hdr.gpu_entry_bytes, hdr.slot_bytes)
    if sizes != (layout.HEADER_BYTES, layout.GPU_ENTRY_BYTES, layout.SLOT_BYTES):
        raise SegmentCorrupt(f"{what} declares record sizes {sizes} that ABI {ABI_VERSION} does not use")
    if not (1 <= hdr.num_gpus <= _MAX_ENTRIES and 1 <= hdr.num_slots <= _MAX_ENTRIES):
        raise SegmentCorrupt(f"{what} declares {hdr.num_gpus} GPUs and {hdr.num_slots} slots")
    expected = layout.segment_bytes(hdr.num_gpus, hdr.num_slots)
    if hdr.total_bytes != expected:
        raise SegmentCorrupt(f"{what} declares {hdr.total_bytes} bytes, its tables need {expected}")
    if size < expected:
        raise SegmentCorrupt(f"{what} is truncated: {size} bytes of {expected}")
    if hdr.owner_uid != os.geteuid():
        raise SegmentPermissionError(f"{what} was made by uid {hdr.owner_uid}, not {os.geteuid()}")
