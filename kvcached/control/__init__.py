"""The control plane: a per-host shared-memory segment of GPU entries and engine slots.

Engines register with :func:`attach_engine`; tools (``kvctl``) read and steer them with
:class:`Controller`. Importing this package imports no torch and no compiled code.
"""

from kvcached.control.api import Controller, Size
from kvcached.control.engine import FROM_ENV, EngineHandle, attach_engine
from kvcached.control.errors import (
    ControlError,
    DuplicateName,
    GpuTableFull,
    InvalidValue,
    SegmentCorrupt,
    SegmentMissing,
    SegmentPermissionError,
    SegmentVersionError,
    SlotTableFull,
    UnknownEngine,
    UnknownGpu,
)
from kvcached.control.layout import ABI_VERSION, EngineKind, EngineState
from kvcached.control.snapshot import EngineInfo, GpuInfo, LimitChange, Snapshot
from kvcached.units import SizeError, format_bytes, parse_size

__all__ = [
    "ABI_VERSION",
    "FROM_ENV",
    "ControlError",
    "Controller",
    "DuplicateName",
    "EngineHandle",
    "EngineInfo",
    "EngineKind",
    "EngineState",
    "GpuInfo",
    "GpuTableFull",
    "InvalidValue",
    "LimitChange",
    "SegmentCorrupt",
    "SegmentMissing",
    "SegmentPermissionError",
    "SegmentVersionError",
    "Size",
    "SizeError",
    "SlotTableFull",
    "Snapshot",
    "UnknownEngine",
    "UnknownGpu",
    "attach_engine",
    "format_bytes",
    "parse_size",
]
