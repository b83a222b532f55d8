"""Engine slots and GPU entries: claim, release, reclaim the dead, consistent reads.

Slots have two seqlocks. ``seq`` covers what the engine writes (its stats, its identity
at claim time); ``ctl_seq`` covers what controllers write (limit, revision, weight, min).
A writer makes the counter odd, writes, and makes it even again; a reader copies the slot
and retries if either counter was odd or moved. Writers of one kind never race: the
engine serializes its own writer threads, and controllers hold the segment lock.
"""

from __future__ import annotations

import ctypes
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager

from kvcached.control import procs
from kvcached.control.atomics import fence, fetch_add_u64
from kvcached.control.errors import (
    ControlError,
    DuplicateName,
    GpuTableFull,
    InvalidValue,
    SlotTableFull,
    UnknownEngine,
)
from kvcached.control.layout import (
    MODEL_BYTES,
    NO_LIMIT,
    UUID_BYTES,
    EngineKind,
    EngineState,
    GpuState,
    Slot,
    encode_limit,
)
from kvcached.control.segment import Segment

__all__ = [
    "check_name",
    "claim_slot",
    "control_write",
    "engine_write",
    "find_engine",
    "find_gpu",
    "find_or_create_gpu",
    "is_dead",
    "name_from_model",
    "read_control",
    "read_slot",
    "reclaim_dead",
    "release_slot",
]

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@+/=-]{0,62}$")
_READ_TIMEOUT_S = 0.5


@contextmanager
def engine_write(slot: Slot) -> Iterator[None]:
    """Write the engine-owned fields of ``slot`` (one writer at a time, by contract)."""
    slot.seq += 1
    fence()
    try:
        yield
    finally:
        fence()
        slot.seq += 1


@contextmanager
def control_write(seg: Segment, slot: Slot) -> Iterator[None]:
    """Write the controller-owned fields of ``slot`` (takes the segment lock)."""
    with seg.lock():
        slot.ctl_seq += 1
        fence()
        try:
            yield
        finally:
            fence()
            slot.ctl_seq += 1
            seg.bump_generation()


def read_slot(seg: Segment, index: int) -> Slot:
    """A consistent private copy of slot ``index``.

    Raises:
        ControlError: the slot stayed mid-write for 0.5 s (its engine is stopped mid-write).
    """
    view = seg.slots[index]
    deadline = 0.0
    while True:
        seq, ctl_seq = view.seq, view.ctl_seq
        if not (seq | ctl_seq) & 1:
            fence()
            copy = Slot.from_buffer_copy(view)
            fence()
            if view.seq == seq and view.ctl_seq == ctl_seq:
                return copy
        now = time.monotonic()
        if not deadline:
            deadline = now + _READ_TIMEOUT_S
        elif now > deadline:
            raise ControlError(f"slot {index} (pid {view.pid}) stayed mid-write for {_READ_TIMEOUT_S} s")
        time.sleep(0.0001)


def read_control(slot: Slot) -> tuple[int, int] | None:
    """``(limit word, limit revision)`` of a live view, or None if a controller is mid-write."""
    ctl_seq = slot.ctl_seq
    if ctl_seq & 1:
        return None
    fence()
    limit_word, revision = int(slot.limit_bytes), int(slot.limit_revision)
    fence()
    return (limit_word, revision) if slot.ctl_seq == ctl_seq else None


def check_name(name: str) -> str:
    """Validate an engine name: 1-63 of ``A-Z a-z 0-9 . _ : @ + / = -``, starting alphanumeric."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise InvalidValue(
            f"bad engine name {name!r}: use 1-63 of A-Z a-z 0-9 . _ : @ + / = -, starting with a letter or digit"
        )
    return name


def name_from_model(model: str, default: str) -> str:
    """A valid engine name for a served model when none was given: ``vllm serve
    /models/llama-8b`` serves "/models/llama-8b", which :func:`check_name` refuses. Other
    characters become ``-``, the last 63 are kept, leading non-alphanumerics dropped;
    ``default`` when nothing is left."""
    name = re.sub(r"[^A-Za-z0-9._:@+/=-]", "-", model)[-63:]
    return re.sub(r"^[^A-Za-z0-9]+", "", name) or default


def _fit(text: str, num_bytes: int) -> bytes:
    raw = text.encode("utf-8")[: num_bytes - 1]
    return raw.decode("utf-8", errors="ignore").encode("utf-8")


def find_gpu(seg: Segment, uuid: str) -> int | None:
    """Index of the GPU entry with ``uuid``, or None."""
    key = uuid.encode("utf-8")
    for gpu in seg.gpus:
        if gpu.state == GpuState.IN_USE and gpu.uuid == key:
            return int(gpu.index)
    return None


def find_or_create_gpu(seg: Segment, uuid: str, total_bytes: int, headroom_bytes: int) -> int:
    """Index of the entry for ``uuid``, creating it if needed (takes the segment lock).

    A new entry has no budget. An existing one keeps its budget and headroom.

    Raises:
        GpuTableFull: no free entry. InvalidValue: an empty or overlong UUID.
    """
    if not uuid or len(uuid.encode("utf-8")) >= UUID_BYTES:
        raise InvalidValue(f"bad GPU UUID {uuid!r}")
    with seg.lock():
        index = find_gpu(seg, uuid)
        if index is not None:
            return index
        for gpu in seg.gpus:
            if gpu.state == GpuState.FREE:
                gpu.uuid = uuid.encode("utf-8")
                gpu.total_bytes, gpu.headroom_bytes = total_bytes, headroom_bytes
                gpu.budget_bytes, gpu.mapped_bytes = NO_LIMIT, 0
                gpu.created_ns = time.time_ns()
                fence()
                gpu.state = GpuState.IN_USE  # published last
                seg.bump_generation()
                return int(gpu.index)
    raise GpuTableFull(f"control segment {seg.name!r}: all {len(seg.gpus)} GPU entries are taken")


def is_dead(slot: Slot) -> bool:
    """Whether a taken slot's process is gone (or its pid now belongs to another process)."""
    return slot.state != EngineState.FREE and not procs.is_alive(slot.pid, slot.start_ticks)


def _return_bytes(seg: Segment, slot: Slot) -> None:
    # The slot's owner no longer maps anything through it (dead, or ledger cleared), so
    # its word is quiet; live engines still add to the GPU word, hence the atomic.
    mapped = int(slot.mapped_bytes)
    if mapped and 0 <= slot.gpu_index < len(seg.gpus):
        fetch_add_u64(seg.address_of(seg.gpus[slot.gpu_index], "mapped_bytes"), -mapped)
    slot.mapped_bytes = 0


def _free(seg: Segment, slot: Slot) -> None:
    _return_bytes(seg, slot)
    with engine_write(slot):
        slot.state = EngineState.FREE
        slot.pid, slot.start_ticks, slot.claim_id = 0, 0, 0
        slot.name, slot.model = b"", b""
    seg.bump_generation()


def reclaim_dead(seg: Segment) -> list[str]:
    """Free every slot whose process is dead, returning its bytes to its GPU. Names freed."""
    if not any(is_dead(slot) for slot in seg.slots):
        return []
    freed = []
    with seg.lock():
        for slot in seg.slots:
            if is_dead(slot):
                freed.append(slot.name.decode("utf-8", errors="replace"))
                _free(seg, slot)
    return freed


def claim_slot(
    seg: Segment,
    name: str,
    model: str,
    kind: EngineKind,
    gpu_index: int,
    limit_bytes: int | None,
    weight: float,
    min_bytes: int,
) -> tuple[int, int]:
    """Claim a free slot for the calling process. Returns ``(slot index, claim id)``.

    The slot starts in ``CLAIMING`` with revision 1 holding ``limit_bytes``.

    Raises:
        DuplicateName: a live engine has ``name``. SlotTableFull: no free slot.
    """
    check_name(name)
    ticks = procs.self_ticks()
    key = name.encode("utf-8")
    with seg.lock():
        reclaim_dead(seg)
        free_index = None
        for i, slot in enumerate(seg.slots):
            if slot.state == EngineState.FREE:
                free_index = i if free_index is None else free_index
            elif slot.name == key:
                raise DuplicateName(f"an engine named {name!r} is already registered (pid {slot.pid})")
        if free_index is None:
            raise SlotTableFull(f"control segment {seg.name!r}: all {len(seg.slots)} engine slots are taken")
        slot = seg.slots[free_index]
        claim_id = int.from_bytes(os.urandom(8), "little") | 1  # never 0, the free value
        with engine_write(slot):
            ctypes.memset(ctypes.addressof(slot) + 16, 0, ctypes.sizeof(Slot) - 16)  # all but the seqlocks
            slot.state, slot.kind, slot.gpu_index = EngineState.CLAIMING, kind, gpu_index
            slot.pid, slot.start_ticks, slot.claim_id = os.getpid(), ticks, claim_id
            slot.name, slot.model = key, _fit(model, MODEL_BYTES)
            slot.started_ns, slot.heartbeat_ns = time.time_ns(), time.monotonic_ns()
            slot.applied_limit_bytes = NO_LIMIT
        with control_write(seg, slot):
            slot.limit_bytes, slot.limit_revision = encode_limit(limit_bytes), 1
            slot.weight, slot.min_bytes = weight, min_bytes
        seg.bump_generation()
    return free_index, claim_id


def release_slot(seg: Segment, index: int, claim_id: int) -> bool:
    """Free our slot and return its bytes to the GPU. False if it was no longer ours.

    Call only after the arena's ledger is cleared (the slot's word must be quiet).
    """
    with seg.lock():
        slot = seg.slots[index]
        if slot.claim_id != claim_id or slot.state == EngineState.FREE:
            return False
        _free(seg, slot)
    return True


def find_engine(seg: Segment, name: str) -> int:
    """Slot index of the live engine ``name``. Raises UnknownEngine."""
    key = name.encode("utf-8") if isinstance(name, str) else b""
    for i, slot in enumerate(seg.slots):
        if slot.state != EngineState.FREE and slot.name == key and not is_dead(slot):
            return i
    raise UnknownEngine(f"no live engine named {name!r}")
