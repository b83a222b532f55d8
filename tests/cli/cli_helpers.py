"""Helpers for the kvctl tests: in-process engines, stand-in engine processes, waiting."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
STANDIN = os.path.join(HERE, "standin_engine.py")
MiB = 1 << 20


@dataclass
class Engine:
    """An engine registered by the test process itself (a real pool, a real slot)."""

    name: str
    dp: Any
    handle: Any
    blocks: list[int] = field(default_factory=list)

    def alloc(self, num_blocks: int) -> list[int]:
        ids = self.dp.alloc(num_blocks)
        assert ids is not None, f"{self.name}: could not allocate {num_blocks} blocks"
        self.blocks += ids
        return ids


def wait_for(predicate: Callable[[], Any], timeout_s: float = 10.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.02)


def read_status(path: str) -> dict[str, Any] | None:
    try:
        with open(path) as f:
            return json.load(f)  # type: ignore[no-any-return]
    except (OSError, ValueError):
        return None


def kvctl_cmd(*args: str) -> list[str]:
    """The argv that runs kvctl in a fresh interpreter (as the console script does)."""
    return [sys.executable, "-c", "import sys; from kvctl.main import app; sys.argv[0] = 'kvctl'; app()", *args]


def standin_cmd(status: str, *args: str) -> list[str]:
    return [sys.executable, STANDIN, "--status", status, *args]


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return False
    return raw[raw.rindex(b")") + 2 :].split()[0] not in (b"Z", b"X")


def start(cmd: list[str], **kwargs: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)
