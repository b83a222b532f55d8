"""``kvctl launch [--name N] [--limit SIZE] [--gpu I] -- CMD ...``: run an engine with kvcached on.

The command runs with ``ENABLE_KVCACHED=true KVCACHED_AUTOPATCH=1`` (the import hook patches
vLLM/SGLang as they load) and ``KVCACHED_ENGINE_NAME``/``KVCACHED_LIMIT``/``KVCACHED_SHM_NAME``
set, in its own process group. Signals kvctl receives (SIGINT, SIGTERM, SIGHUP, SIGQUIT,
SIGUSR1, SIGUSR2) go to that group, as a terminal would send them to a foreground job; a
Ctrl-C at the terminal reaches only kvctl, so the engine sees it once. When the command
exits, processes it left in its group get SIGTERM (SIGKILL after ``--grace``), the slots of
its engines are reclaimed, and its exit status becomes kvctl's (128+N for signal N).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from typing import Annotated, Any

import typer

from kvctl import ctl
from kvctl.errors import CliError

__all__ = ["FORWARDED_SIGNALS", "group_pids", "launch"]

FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
# Mirrors the control plane's rule so a bad name fails here, not inside the engine (see
# docs/notes/requests-kvctl.md: kvcached.control should export its check).
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@+/=-]{0,62}$")


def group_pids(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group ``pgid``, from ``/proc``."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                raw = f.read()
        except OSError:
            continue
        fields = raw[raw.rindex(b")") + 2 :].split()
        if fields[0] not in (b"Z", b"X") and int(fields[2]) == pgid:
            pids.append(int(entry))
    return pids


class _Forwarder:
    """Signal handlers that pass signals on to the engine's group (queued until it exists)."""

    def __init__(self) -> None:
        self.pgid: int | None = None
        self.pending: list[int] = []
        self._saved: dict[int, Any] = {}

    def __enter__(self) -> _Forwarder:
        for sig in FORWARDED_SIGNALS:
            self._saved[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: object) -> None:
        if self.pgid is None:
            self.pending.append(signum)
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pgid, signum)

    def started(self, pgid: int) -> None:
        self.pgid = pgid
        for signum in self.pending:
            self._handle(signum, None)
        self.pending.clear()


def _own_group() -> dict[str, Any]:
    # The engine's own process group, so a terminal's Ctrl-C reaches it once (through us).
    if sys.version_info >= (3, 11):
        return {"process_group": 0}
    return {"preexec_fn": os.setpgrp}


def _environment(name: str | None, limit: str | None, gpu: int | None) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"ENABLE_KVCACHED": "true", "KVCACHED_AUTOPATCH": "1", "KVCACHED_SHM_NAME": ctl.segment_name()})
    if name is not None:
        env["KVCACHED_ENGINE_NAME"] = name
    if limit is not None:
        env["KVCACHED_LIMIT"] = limit
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    return env


def _check_name_free(name: str) -> None:
    from kvcached.control import SegmentMissing

    try:
        with ctl.open_controller() as controller:
            engines = controller.snapshot().engines
    except SegmentMissing:
        return
    for e in engines:
        if e.name == name:
            raise CliError(f"an engine named {name!r} is already running (pid {e.pid}); pick another --name")


def _clean_group(pgid: int, grace_s: float) -> None:
    left = group_pids(pgid)
    if not left:
        return
    sys.stderr.write(f"kvctl launch: the engine left {len(left)} process(es) behind; stopping them\n")
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while group_pids(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if group_pids(pgid):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)


def _reclaim() -> None:
    from kvcached.control import ControlError

    try:
        with ctl.open_controller() as controller:
            freed = controller.reclaim_dead()
    except ControlError:
        return  # no segment (the engine never registered) or one we cannot use: nothing of ours in it
    if freed:
        sys.stderr.write(
            f"kvctl launch: reclaimed the slot(s) of {', '.join(map(repr, freed))} (the engine exited without releasing them)\n"
        )


def launch(
    cmd: Annotated[
        list[str],
        typer.Argument(metavar="-- CMD ...", help="The engine command, e.g. -- vllm serve MODEL.", show_default=False),
    ],
    name: Annotated[
        str | None, typer.Option("--name", metavar="N", help="Name the engine registers under (default: its model).")
    ] = None,
    limit: Annotated[
        str | None, typer.Option("--limit", metavar="SIZE|PCT", help="Initial KV limit: 512MiB, 12G, 30% or none.")
    ] = None,
    gpu: Annotated[
        int | None, typer.Option("--gpu", min=0, metavar="I", help="Run on this GPU (sets CUDA_VISIBLE_DEVICES).")
    ] = None,
    grace: Annotated[
        float, typer.Option("--grace", min=0, metavar="S", help="Seconds leftover processes get after SIGTERM.")
    ] = 5.0,
) -> None:
    """Run an engine command with kvcached enabled; forward signals, pass its exit code, clean up its slot."""
    if not cmd:
        raise CliError("no command given: put the engine command after --, e.g. kvctl launch -- vllm serve MODEL")
    if name is not None:
        if not _NAME_RE.match(name):
            raise CliError(
                f"bad engine name {name!r}: use 1-63 of A-Z a-z 0-9 . _ : @ + / = -, starting with a letter or digit"
            )
        _check_name_free(name)
    if limit is not None:
        ctl.check_size(limit, "limit")
    with _Forwarder() as forwarder:
        try:
            proc = subprocess.Popen(cmd, env=_environment(name, limit, gpu), **_own_group())
        except FileNotFoundError:
            raise CliError(f"command not found: {cmd[0]!r} (give the engine command after --)", 127) from None
        except PermissionError:
            raise CliError(f"command not executable: {cmd[0]!r}", 126) from None
        forwarder.started(proc.pid)
        try:
            code = proc.wait()
        finally:
            if proc.poll() is None:  # kvctl itself is being torn down: take the engine with it
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                proc.wait()
            _clean_group(proc.pid, grace)
            _reclaim()
    raise typer.Exit(code if code >= 0 else 128 - code)
