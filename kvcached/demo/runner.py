"""Start, watch and stop a demo: N engine processes sharing one budget in a fresh segment.

Each run gets its own segment (``kvcached-demo-<pid>-<random>``), so two demos never meet,
and removes it at the end. The engines run in their own sessions (a Ctrl-C at the
terminal reaches only the runner, which then stops them in order) and stop by themselves
if the runner dies (their stdin closes). :meth:`DemoRun.close` leaves nothing behind: it
stops or kills every engine, reclaims their slots and unlinks the segment; it is safe to
call at any point, also after a failed start.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import kvcached
from kvcached.control import Controller
from kvcached.demo.engine import EngineReport, EngineSpec
from kvcached.demo.workload import Workload

_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(kvcached.__file__)))

__all__ = ["DemoConfig", "DemoError", "DemoRun", "default_budget_bytes"]

MiB = 1 << 20


def default_budget_bytes(num_engines: int) -> int:
    """A budget that holds one engine's peak next to the others' base load, tight enough
    that overlapping peaks meet it, and far under what a static split would need to give
    every engine its peak."""
    return (288 + 32 * num_engines) * MiB


@dataclass(frozen=True)
class DemoConfig:
    """A demo run. ``budget_bytes`` None: :func:`default_budget_bytes`."""

    num_engines: int = 3
    duration_s: float = 30.0
    budget_bytes: int | None = None
    backend: str = "host"
    tensors: bool = False
    peak_slot_s: float = 4.0  # engines peak in turn, one slot each, every num_engines slots
    seed: int = 0
    start_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        if not 1 <= self.num_engines <= 16:
            raise ValueError(f"num_engines must be 1..16, got {self.num_engines}")
        if not self.duration_s > 0:
            raise ValueError(f"duration_s must be > 0, got {self.duration_s}")
        if self.backend not in ("host", "cuda"):
            raise ValueError(f"backend must be 'host' or 'cuda', got {self.backend!r}")

    @property
    def budget(self) -> int:
        return self.budget_bytes if self.budget_bytes is not None else default_budget_bytes(self.num_engines)


class DemoError(RuntimeError):
    """An engine failed to start or died during the demo (the text says which and why)."""


class DemoRun:
    """One demo. Use as a context manager: ``start()``, watch, ``stop()``; exit cleans up."""

    def __init__(self, config: DemoConfig) -> None:
        self.config = config
        self.shm_name = f"kvcached-demo-{os.getpid()}-{secrets.token_hex(3)}"
        self.controller: Controller | None = None
        self.t0: float | None = None
        self._dir = tempfile.mkdtemp(prefix="kvcached-demo-")
        self.specs = [self._spec(i) for i in range(config.num_engines)]
        self._procs: list[subprocess.Popen[str]] = []
        self._stopped = False

    def _spec(self, i: int) -> EngineSpec:
        cfg = self.config
        workload = Workload(
            seed=cfg.seed * 1000 + i + 1,
            period_s=cfg.peak_slot_s * cfg.num_engines,
            phase_s=1.0 + i * cfg.peak_slot_s,
        )
        return EngineSpec(
            name=f"demo-{i + 1}",
            shm_name=self.shm_name,
            report_path=os.path.join(self._dir, f"demo-{i + 1}.json"),
            workload=workload,
            duration_s=cfg.duration_s,
            backend=cfg.backend,
            tensors=cfg.tensors,
            host_cap_bytes=max(cfg.budget, 64 * MiB),
        )

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        """Start the engines, wait until all registered, set the budget, start the clock.

        Raises:
            DemoError: an engine exited or did not register within ``start_timeout_s``.
        """
        for spec in self.specs:
            err = open(self._stderr_path(spec), "w")  # noqa: SIM115 - the child owns it
            proc = subprocess.Popen(
                [sys.executable, "-m", "kvcached.demo.engine", spec.to_json()],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                start_new_session=True,
                # `-m` puts the working directory first on sys.path; run from the
                # directory the installed package lives in, so a kvcached source
                # checkout in the user's cwd (no compiled core) is not imported instead.
                cwd=_PACKAGE_PARENT,
            )
            err.close()
            self._procs.append(proc)
        self._wait_lines("ready", self.config.start_timeout_s)
        self.controller = Controller.open(self.shm_name)
        snap = self.controller.snapshot()
        for uuid in {e.gpu_uuid for e in snap.engines}:
            self.controller.set_budget(uuid, self.config.budget)
        self.t0 = time.monotonic() + 0.05
        for proc in self._procs:
            self._send(proc, f"go {self.t0!r}")

    def _wait_lines(self, word: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        with selectors.DefaultSelector() as sel:
            for spec, proc in zip(self.specs, self._procs, strict=True):
                assert proc.stdout is not None
                sel.register(proc.stdout, selectors.EVENT_READ, spec)
            waiting = len(self._procs)
            while waiting:
                events = sel.select(max(deadline - time.monotonic(), 0.0))
                if not events:
                    raise DemoError(f"engines did not say {word!r} within {timeout_s:g} s")
                for key, _ in events:
                    line = key.fileobj.readline()  # type: ignore[union-attr]
                    if line.strip() == word:
                        sel.unregister(key.fileobj)
                        waiting -= 1
                    elif not line:
                        raise DemoError(f"engine {key.data.name} exited: {self._last_error(key.data)}")

    def _send(self, proc: subprocess.Popen[str], line: str) -> None:
        with contextlib.suppress(BrokenPipeError, OSError, ValueError):
            assert proc.stdin is not None
            proc.stdin.write(line + "\n")
            proc.stdin.flush()

    @property
    def elapsed_s(self) -> float:
        return 0.0 if self.t0 is None else max(time.monotonic() - self.t0, 0.0)

    @property
    def finished(self) -> bool:
        """The duration is over (the engines stop by themselves then)."""
        return self.t0 is not None and self.elapsed_s >= self.config.duration_s

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def check(self) -> None:
        """Raise DemoError if an engine died before being asked to stop."""
        for spec, proc in zip(self.specs, self._procs, strict=True):
            code = proc.poll()
            if code is not None and code != 0:
                raise DemoError(f"engine {spec.name} died (exit {code}): {self._last_error(spec)}")

    def stop(self, timeout_s: float = 15.0) -> list[EngineReport]:
        """Ask every engine to stop, wait for them and collect their reports.

        Raises:
            DemoError: an engine did not stop in time or wrote no report.
        """
        self._stopped = True
        for proc in self._procs:
            self._send(proc, "stop")
            with contextlib.suppress(OSError):
                assert proc.stdin is not None
                proc.stdin.close()
        deadline = time.monotonic() + timeout_s
        for spec, proc in zip(self.specs, self._procs, strict=True):
            try:
                code = proc.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                raise DemoError(f"engine {spec.name} (pid {proc.pid}) did not stop within {timeout_s:g} s") from None
            if code != 0:
                raise DemoError(f"engine {spec.name} exited with {code}: {self._last_error(spec)}")
        reports = []
        for spec in self.specs:
            try:
                with open(spec.report_path) as f:
                    reports.append(EngineReport.from_json(f.read()))
            except (OSError, ValueError, TypeError) as exc:
                raise DemoError(f"engine {spec.name} wrote no usable report: {exc}") from None
        return reports

    def close(self) -> None:
        """Kill what still runs, reclaim slots, unlink the segment, remove the temp files."""
        for proc in self._procs:
            if proc.poll() is None:
                with contextlib.suppress(OSError):
                    os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5.0)
            for stream in (proc.stdin, proc.stdout):
                with contextlib.suppress(OSError):
                    if stream is not None:
                        stream.close()
        if self.controller is not None:
            self.controller.reclaim_dead()
            self.controller.close()
            self.controller = None
        Controller.unlink(self.shm_name)
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> DemoRun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- helpers ---------------------------------------------------------------------

    def _stderr_path(self, spec: EngineSpec) -> str:
        return os.path.join(self._dir, f"{spec.name}.err")

    def _last_error(self, spec: EngineSpec) -> str:
        try:
            with open(self._stderr_path(spec)) as f:
                lines = [line.strip() for line in f if line.strip()]
        except OSError:
            lines = []
        return lines[-1] if lines else "no error output"
