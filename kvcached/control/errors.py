"""The control plane's errors: one class per condition a caller can act on.

Every message is one line and names what was wrong; nothing in the segment has changed
when one of these is raised.
"""

from __future__ import annotations

__all__ = [
    "ControlError",
    "DuplicateName",
    "GpuTableFull",
    "InvalidValue",
    "SegmentCorrupt",
    "SegmentMissing",
    "SegmentPermissionError",
    "SegmentVersionError",
    "SlotTableFull",
    "UnknownEngine",
    "UnknownGpu",
]


class ControlError(Exception):
    """Base of every control-plane error."""


class SegmentMissing(ControlError):
    """No segment of that name exists (no engine has registered yet, or it was removed)."""


class SegmentVersionError(ControlError):
    """The segment was made by another ABI version of kvcached."""


class SegmentCorrupt(ControlError):
    """The segment is truncated, never finished initializing, or holds values no writer makes."""


class SegmentPermissionError(ControlError):
    """The segment belongs to another user or is open to other users."""


class SlotTableFull(ControlError):
    """Every engine slot is taken by a live engine."""


class GpuTableFull(ControlError):
    """Every GPU entry is taken."""


class DuplicateName(ControlError):
    """A live engine already uses that name."""


class UnknownEngine(ControlError):
    """No live engine has that name."""


class UnknownGpu(ControlError):
    """No GPU entry matches that UUID or index."""


class InvalidValue(ControlError, ValueError):
    """A limit, weight, size, budget or name that cannot be used."""
