"""What every command shares: the segment to open, size arguments, JSON of a snapshot.

kvctl reaches the library only through ``kvcached.control`` (imported lazily, so
``kvctl --help`` stays light), and parses every size with its ``parse_size``.
"""

from __future__ import annotations

import enum
import json
import os
import sys
from dataclasses import fields
from typing import TYPE_CHECKING, Any

from kvctl.errors import CliError

if TYPE_CHECKING:
    from kvcached.control import Controller, EngineInfo, GpuInfo, Snapshot

__all__ = [
    "NO_LIMIT_WORDS",
    "SIZE_ALLOWED",
    "check_size",
    "open_controller",
    "print_json",
    "segment_name",
    "segment_override",
    "set_segment",
    "snapshot_json",
    "unknown_engine",
]

NO_LIMIT_WORDS = ("none", "unlimited", "inf")
SIZE_ALLOWED = "a size like 512MiB or 12G, a percentage like 30% (0-100, of the GPU), or none"

segment_override: str | None = None  # --segment, set by the app callback


def set_segment(name: str | None) -> None:
    global segment_override
    segment_override = name


def segment_name() -> str:
    """The segment commands talk to: ``--segment``, else ``KVCACHED_SHM_NAME``, else per user."""
    if segment_override:
        return segment_override
    from kvcached import envs

    return str(envs.get("KVCACHED_SHM_NAME")) or f"kvcached-{os.geteuid()}"


def open_controller() -> Controller:
    """Open the segment (errors pass to the group, which prints them in one line)."""
    from kvcached.control import Controller

    return Controller.open(segment_name())


def check_size(text: str, what: str, allow_none: bool = True) -> str:
    """Validate a size argument with ``parse_size`` and return it as given (the controller
    resolves a percentage against the right total).

    Raises:
        CliError: one line naming the bad value and what is allowed.
    """
    from kvcached.control import SizeError, parse_size

    allowed = (
        SIZE_ALLOWED
        if allow_none
        else SIZE_ALLOWED.replace(", or none", "").replace(", a percentage", " or a percentage")
    )
    if text.strip().lower() in NO_LIMIT_WORDS:
        if allow_none:
            return text
        raise CliError(f"{what} cannot be {text!r}: give {allowed}")
    try:
        parse_size(text, 1 << 40)
    except SizeError as exc:
        raise CliError(f"bad {what} {text!r}: {_first_clause(str(exc))}; allowed: {allowed}") from None
    return text


def _first_clause(message: str) -> str:
    return message.split(": expected", 1)[0]


def unknown_engine(name: str, snapshot: Snapshot) -> CliError:
    """The error for a name no live engine has, listing the ones there are."""
    names = ", ".join(sorted(e.name for e in snapshot.engines))
    if not names:
        return CliError(f"no live engine named {name!r} (no engine is registered in segment {segment_name()!r})")
    return CliError(f"no live engine named {name!r} (live engines: {names})")


def _plain(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.name.lower()
    return value


def gpu_json(gpu: GpuInfo) -> dict[str, Any]:
    row = {f.name: _plain(getattr(gpu, f.name)) for f in fields(gpu)}
    row["capacity_bytes"] = gpu.capacity_bytes
    return row


def engine_json(engine: EngineInfo) -> dict[str, Any]:
    row = {f.name: _plain(getattr(engine, f.name)) for f in fields(engine)}
    row["limit_pending"] = engine.limit_pending
    return row


def snapshot_json(snapshot: Snapshot, segment: str) -> dict[str, Any]:
    """A stable JSON shape: ``{"segment", "gpus": [...], "engines": [...]}``, bytes as integers."""
    return {
        "segment": segment,
        "gpus": [gpu_json(g) for g in snapshot.gpus],
        "engines": [engine_json(e) for e in snapshot.engines],
    }


def print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, sort_keys=False) + "\n")
