"""The shared-memory segment's layout, defined once: header, GPU entries, engine slots.

The segment is ``Header | GpuEntry * num_gpus | Slot * num_slots``. Every counter is an
8-byte aligned ``uint64`` because the compiled core updates some of them with atomics
(``GpuEntry.mapped_bytes``, ``Slot.mapped_bytes``) and reads ``GpuEntry.budget_bytes``.
Any change to these structures bumps :data:`ABI_VERSION`; openers refuse other versions.

Who writes what:

- ``Header``: the creator, once (``generation`` is bumped under the segment lock).
- ``GpuEntry``: created under the segment lock; ``budget_bytes`` by the controller;
  ``mapped_bytes`` by the core's atomics (and the reclaimer, atomically).
- ``Slot``: identity under the segment lock; the engine fields by the engine alone, inside
  ``seq`` (a seqlock); the control fields (limit, weight, min) by controllers under the
  segment lock, inside ``ctl_seq``; ``mapped_bytes`` by the core's atomics.
"""

from __future__ import annotations

import ctypes
import zlib
from enum import IntEnum

__all__ = [
    "ABI_VERSION",
    "FLAG_AT_SHARE",
    "FLAG_LIMIT_MET",
    "FLAG_WATCH_ERROR",
    "MAGIC",
    "MODEL_BYTES",
    "NAME_BYTES",
    "NO_LIMIT",
    "UUID_BYTES",
    "EngineKind",
    "EngineState",
    "GpuEntry",
    "GpuState",
    "Header",
    "Slot",
    "decode_limit",
    "encode_limit",
    "header_checksum",
    "segment_bytes",
]

MAGIC = int.from_bytes(b"KVCACHED", "little")
ABI_VERSION = 2  # 2: Slot.num_sync_maps
NO_LIMIT = (1 << 64) - 1  # "no budget" / "no limit"; the core reads UINT64_MAX the same way

NAME_BYTES = 64
MODEL_BYTES = 256
UUID_BYTES = 64

HEADER_BYTES = 256
GPU_ENTRY_BYTES = 256
SLOT_BYTES = 1024

FLAG_LIMIT_MET = 1 << 0  # the pool is within its limit (live blocks may keep it over)
FLAG_WATCH_ERROR = 1 << 1  # the engine's watcher hit an error applying a limit
FLAG_AT_SHARE = 1 << 2  # a peer is short of memory: this engine is held to its fair share


class EngineKind(IntEnum):
    """Which serving engine a slot belongs to."""

    OTHER = 0
    VLLM = 1
    SGLANG = 2


class EngineState(IntEnum):
    """Lifecycle of a slot. FREE slots hold no engine."""

    FREE = 0
    CLAIMING = 1
    STARTING = 2
    RUNNING = 3
    SLEEPING = 4
    EXITING = 5


class GpuState(IntEnum):
    FREE = 0
    IN_USE = 1


u32, i32, u64, f64 = ctypes.c_uint32, ctypes.c_int32, ctypes.c_uint64, ctypes.c_double


def _spare(fields: list[tuple[str, type]], size: int) -> type[ctypes.Array[ctypes.c_uint8]]:
    """Padding that brings a record with ``fields`` to ``size`` bytes (room to grow)."""
    core = type("_Core", (ctypes.Structure,), {"_fields_": fields})
    if ctypes.sizeof(core) > size:
        raise TypeError(f"record needs {ctypes.sizeof(core)} bytes, more than its {size}")
    return ctypes.c_uint8 * (size - ctypes.sizeof(core))


_HEADER_FIELDS: list[tuple[str, type]] = [
    ("magic", u64),  # written last by the initializer: non-zero means "ready"
    ("abi_version", u32),
    ("header_bytes", u32),
    ("gpu_entry_bytes", u32),
    ("slot_bytes", u32),
    ("num_gpus", u32),
    ("num_slots", u32),
    ("total_bytes", u64),
    ("owner_uid", u32),
    ("_pad0", u32),
    ("creation_id", u64),  # random per segment incarnation
    ("created_ns", u64),
    ("checksum", u64),  # crc32 of the bytes between magic and checksum
    ("generation", u64),  # bumped after every change to the tables or the control fields
]

_GPU_FIELDS: list[tuple[str, type]] = [
    ("state", u32),
    ("index", u32),
    ("uuid", ctypes.c_char * UUID_BYTES),
    ("total_bytes", u64),
    ("budget_bytes", u64),  # read by the core before every map; NO_LIMIT = none
    ("mapped_bytes", u64),  # the core's atomic sum over this GPU's engines
    ("headroom_bytes", u64),
    ("created_ns", u64),
    # CLOCK_MONOTONIC of the last time an engine here was refused memory below its own
    # limit: the budget or the device is full, so the others give back idle reserve pages.
    ("pressure_ns", u64),
]

_SLOT_FIELDS: list[tuple[str, type]] = [
    ("seq", u64),  # engine-side seqlock: odd while the engine writes
    ("ctl_seq", u64),  # controller-side seqlock: odd while a controller writes
    ("state", u32),
    ("kind", u32),
    ("pid", u32),
    ("gpu_index", i32),  # index of the GpuEntry, -1 = none yet
    ("start_ticks", u64),  # the process's start time in clock ticks since boot
    ("claim_id", u64),  # random per claim, so a reader can tell a reused slot
    ("name", ctypes.c_char * NAME_BYTES),
    ("model", ctypes.c_char * MODEL_BYTES),
    ("page_bytes", u64),
    ("reserved_bytes", u64),  # virtual address space reserved for the KV cache
    ("mapped_bytes", u64),  # the core's atomic count of this engine's mapped bytes
    ("used_bytes", u64),
    ("cached_bytes", u64),
    ("reserve_bytes", u64),
    ("demand_bytes", u64),  # what the engine would use now: used + its largest recent shortfall
    ("applied_revision", u64),
    ("applied_limit_bytes", u64),
    ("flags", u64),
    ("num_allocs", u64),
    ("num_denied", u64),
    ("num_maps", u64),  # page groups mapped since the start
    ("num_unmaps", u64),
    ("num_sync_maps", u64),  # pages the engine's own allocation path had to map (the prefetch fell behind)
    ("heartbeat_ns", u64),  # CLOCK_MONOTONIC, host-wide
    ("started_ns", u64),  # wall clock
    # Control fields, written by controllers inside ctl_seq.
    ("limit_bytes", u64),
    ("limit_revision", u64),
    ("weight", f64),
    ("min_bytes", u64),
]


class Header(ctypes.Structure):
    _fields_ = [*_HEADER_FIELDS, ("_spare", _spare(_HEADER_FIELDS, HEADER_BYTES))]


class GpuEntry(ctypes.Structure):
    _fields_ = [*_GPU_FIELDS, ("_spare", _spare(_GPU_FIELDS, GPU_ENTRY_BYTES))]


class Slot(ctypes.Structure):
    _fields_ = [*_SLOT_FIELDS, ("_spare", _spare(_SLOT_FIELDS, SLOT_BYTES))]


_CHECKSUM_START = Header.abi_version.offset
_CHECKSUM_END = Header.checksum.offset


def segment_bytes(num_gpus: int, num_slots: int) -> int:
    """Total size of a segment with these table sizes."""
    return HEADER_BYTES + num_gpus * GPU_ENTRY_BYTES + num_slots * SLOT_BYTES


def header_checksum(raw: bytes) -> int:
    """Checksum of the static header fields, from the header's raw bytes."""
    return zlib.crc32(raw[_CHECKSUM_START:_CHECKSUM_END])


def encode_limit(limit_bytes: int | None) -> int:
    return NO_LIMIT if limit_bytes is None else limit_bytes


def decode_limit(word: int) -> int | None:
    return None if word == NO_LIMIT else word
