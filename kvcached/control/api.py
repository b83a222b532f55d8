"""``Controller``: read the segment and write limits, weights, mins and budgets.

This is what ``kvctl`` uses (and all it may use). It imports no torch and no compiled core.
Every writer validates all of its input before touching the segment, so an error leaves
the segment as it was.
"""

from __future__ import annotations

import math
import time

from kvcached.control import registry
from kvcached.control.errors import InvalidValue
from kvcached.control.layout import encode_limit
from kvcached.control.segment import Segment
from kvcached.control.snapshot import LimitChange, Snapshot, read_gpus, take_snapshot
from kvcached.units import SizeError, parse_size

__all__ = ["Controller", "Size"]

Size = int | str | None  # bytes, "512MiB", "30%" (of the GPU), or None / "none" for no limit
_MAX_BYTES = (1 << 63) - 1


class Controller:
    """A handle on one control segment.

    Thread safety: methods may be called from several threads; writes are serialized by
    the segment lock, which also orders them against other processes.
    """

    def __init__(self, segment: Segment) -> None:
        self.segment = segment

    @classmethod
    def open(cls, shm_name: str | None = None, create: bool = False) -> Controller:
        """Open the segment (default ``KVCACHED_SHM_NAME`` or ``kvcached-<uid>``).

        Raises:
            SegmentMissing (unless ``create``), SegmentVersionError, SegmentCorrupt,
            SegmentPermissionError.
        """
        return cls(Segment.open(shm_name, create=create))

    @staticmethod
    def unlink(shm_name: str | None = None) -> bool:
        """Remove the segment's name (running engines keep their mapping). False if absent."""
        from kvcached.control.segment import default_name

        return Segment.unlink(default_name() if shm_name is None else shm_name)

    @property
    def name(self) -> str:
        return self.segment.name

    def close(self) -> None:
        self.segment.close()

    def __enter__(self) -> Controller:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading ---------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        """Every GPU entry and live engine; dead engines' slots are reclaimed first."""
        return take_snapshot(self.segment)

    def reclaim_dead(self) -> list[str]:
        """Free the slots of engines whose process died; their bytes return to their GPU."""
        return registry.reclaim_dead(self.segment)

    def wait_applied(self, name: str, revision: int, timeout_s: float = 1.0) -> bool:
        """Wait until engine ``name`` applied limit ``revision``. False on timeout.

        Raises:
            UnknownEngine: it is not (or no longer) registered.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            index = registry.find_engine(self.segment, name)
            if self.segment.slots[index].applied_revision >= revision:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.0005)

    # -- writing ---------------------------------------------------------------------

    def set_limit(self, name: str, limit: Size) -> int:
        """Set engine ``name``'s KV limit (None: unlimited). Returns the new revision.

        A percentage is of the engine's GPU capacity (budget, else total minus headroom).

        Raises:
            UnknownEngine, InvalidValue.
        """
        with self.segment.lock():
            index = registry.find_engine(self.segment, name)
            slot = self.segment.slots[index]
            limit_bytes = _size("limit", limit, self._capacity_of(slot.gpu_index))
            with registry.control_write(self.segment, slot):
                slot.limit_bytes = encode_limit(limit_bytes)
                slot.limit_revision += 1
                return int(slot.limit_revision)

    def set_weight(self, name: str, weight: float) -> None:
        """Set engine ``name``'s weight (> 0) for rebalance policies."""
        if (
            isinstance(weight, bool)
            or not isinstance(weight, (int, float))
            or not (weight > 0 and math.isfinite(weight))
        ):
            raise InvalidValue(f"weight must be a finite number > 0, got {weight!r}")
        with self.segment.lock():
            slot = self.segment.slots[registry.find_engine(self.segment, name)]
            with registry.control_write(self.segment, slot):
                slot.weight = float(weight)

    def set_min(self, name: str, min_bytes: int | str) -> None:
        """Set the least limit a policy may give engine ``name`` (a size or percentage)."""
        with self.segment.lock():
            slot = self.segment.slots[registry.find_engine(self.segment, name)]
            value = _size("min", min_bytes, self._capacity_of(slot.gpu_index))
            if value is None:
                raise InvalidValue("min must be a size, not none")
            with registry.control_write(self.segment, slot):
                slot.min_bytes = value

    def set_budget(self, gpu: str | int, budget: Size) -> None:
        """Cap what kvcached engines may map on ``gpu`` together (None: no cap).

        ``gpu`` is a UUID, a unique UUID prefix or the entry's index; a percentage is of
        the GPU's total memory. Maps beyond the budget are refused from the next map on;
        memory already mapped stays (lower the engines' limits, or rebalance, to shrink it).

        Raises:
            UnknownGpu, InvalidValue.
        """
        with self.segment.lock():
            info = Snapshot(list(read_gpus(self.segment).values()), [], 0, 0).gpu(gpu)
            budget_bytes = _size("budget", budget, info.total_bytes)
            self.segment.gpus[info.index].budget_bytes = encode_limit(budget_bytes)
            self.segment.bump_generation()

    def rebalance(self, policy: str = "demand", dry_run: bool = False) -> list[LimitChange]:
        """Compute new limits with ``policy`` ("demand", "equal", "priority") and, unless
        ``dry_run``, set them. Returns the changes (engines whose limit differs).

        Raises:
            InvalidValue: an unknown policy.
        """
        from kvcached.control.policies import POLICIES

        if policy not in POLICIES:
            raise InvalidValue(f"unknown policy {policy!r}: expected one of {', '.join(POLICIES)}")
        with self.segment.lock():
            snap = self.snapshot()
            limits = POLICIES[policy](snap)
            changes = [
                LimitChange(e.name, e.gpu_uuid, e.limit_bytes, limits[e.name])
                for e in snap.engines
                if e.name in limits and limits[e.name] != e.limit_bytes
            ]
            if not dry_run:
                for change in changes:
                    self.set_limit(change.name, change.new_limit_bytes)
        return changes

    def _capacity_of(self, gpu_index: int) -> int | None:
        gpus = read_gpus(self.segment)
        return gpus[gpu_index].capacity_bytes if gpu_index in gpus else None

    def __repr__(self) -> str:
        return f"Controller({self.segment.name!r})"


def _size(what: str, value: Size, total_bytes: int | None) -> int | None:
    """Validate a size given as bytes or text; None / "none" / "unlimited" mean no limit."""
    if value is None:
        return None
    if isinstance(value, str):
        if value.strip().lower() in ("none", "unlimited", "inf"):
            return None
        try:
            value = parse_size(value, total_bytes)
        except SizeError as exc:
            raise InvalidValue(f"bad {what}: {exc}") from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidValue(f"bad {what} {value!r}: expected bytes (an integer), a size string or None")
    if not 0 <= value <= _MAX_BYTES:
        raise InvalidValue(f"bad {what} {value}: must be between 0 and 2**63-1 bytes")
    return value
