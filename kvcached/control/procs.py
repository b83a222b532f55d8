"""Is the process that owns a slot still the one that claimed it?

A pid alone is not an identity: pids are reused. We pair it with the process's start
time in clock ticks since boot (``/proc/<pid>/stat`` field 22), an exact integer, and read
``/proc`` directly rather than importing psutil so that ``kvctl`` starts fast.
"""

from __future__ import annotations

import os

__all__ = ["is_alive", "self_ticks", "start_ticks"]


def start_ticks(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot; None if it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) is in parentheses and may itself hold spaces and ')'.
    fields = raw[raw.rindex(b")") + 2 :].split()
    state, ticks = fields[0], fields[19]
    if state in (b"Z", b"X"):
        return None
    return int(ticks)


def is_alive(pid: int, ticks: int) -> bool:
    """Whether ``pid`` is running and is the same process that started at ``ticks``."""
    if pid <= 0:
        return False
    try:
        return start_ticks(pid) == ticks
    except PermissionError:
        # /proc mounted with hidepid: we cannot tell, so we never reclaim what we cannot see.
        return True


def self_ticks() -> int:
    """Start time of the calling process."""
    ticks = start_ticks(os.getpid())
    if ticks is None:
        raise RuntimeError("cannot read /proc/self/stat")
    return ticks
