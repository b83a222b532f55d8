"""One demo engine process: a real KV pool registered in the control plane, driven by a
request stream.

Run by :mod:`kvcached.demo.runner` as ``python -m kvcached.demo.engine SPEC_JSON``. The
conversation with the runner is line-based:

* the engine prints ``ready`` once its slot is registered;
* the runner writes ``go T0`` (a ``CLOCK_MONOTONIC`` time, host-wide) and the engine runs
  step ``k`` at ``T0 + k * step_s`` until its duration is over;
* any further line, end of input (the runner died) or SIGTERM stops it early;
* it writes its report (JSON) to ``report_path``, releases its slot and pool, prints
  ``done`` and exits 0.

SIGINT is ignored: the runner decides when the demo ends (a Ctrl-C at the terminal
reaches the whole foreground process group).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field

from kvcached.demo.pool import DemoPool, ModelShape, build_pool
from kvcached.demo.scheduler import Scheduler
from kvcached.demo.workload import Workload, arrivals

__all__ = ["EngineReport", "EngineSpec", "main", "run_engine"]


@dataclass(frozen=True)
class EngineSpec:
    """Everything one demo engine needs to know."""

    name: str
    shm_name: str
    report_path: str
    workload: Workload = field(default_factory=Workload)
    shape: ModelShape = field(default_factory=ModelShape)
    duration_s: float = 30.0
    backend: str = "host"
    tensors: bool = False
    virtual_bytes: int = 1 << 30
    host_cap_bytes: int = 4 << 30
    page_bytes: int | None = 256 << 10

    @property
    def num_steps(self) -> int:
        return max(1, round(self.duration_s / self.workload.step_s))

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> EngineSpec:
        raw = json.loads(text)
        workload = raw.pop("workload")
        for key in ("prompt_tokens", "output_tokens"):
            workload[key] = tuple(workload[key])
        return cls(workload=Workload(**workload), shape=ModelShape(**raw.pop("shape")), **raw)


@dataclass(frozen=True)
class EngineReport:
    """What one engine saw, written at exit."""

    name: str
    num_steps: int  # steps run
    block_bytes: int
    group_bytes: int
    blocks_per_page: int
    num_arrived: int
    num_started: int
    num_finished: int
    num_waited: int
    num_refused: int
    num_preempted: int
    peak_used_bytes: int
    peak_mapped_bytes: int
    max_lag_s: float  # how far behind its step clock the engine fell at worst

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> EngineReport:
        return cls(**json.loads(text))


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _watch_stdin(stop: threading.Event) -> None:
    # The next line, or EOF when the runner is gone, means "stop".
    sys.stdin.readline()
    stop.set()


def run_engine(spec: EngineSpec, stop: threading.Event) -> EngineReport:
    """Register, wait for ``go``, run the stream, report. Releases everything it made."""
    from kvcached.control import attach_engine

    dp = build_pool(spec.shape, spec.backend, spec.virtual_bytes, spec.host_cap_bytes, spec.tensors, spec.page_bytes)
    try:
        handle = attach_engine(
            dp.pool,
            spec.name,
            spec.shape.name,
            "other",
            spec.shm_name,
            arena=dp.arena,
            backend=dp.backend,
            limit_bytes=None,
            headroom_bytes=0,
        )
        try:
            return _serve(spec, dp, stop)
        finally:
            handle.close()
    finally:
        dp.close()


def _serve(spec: EngineSpec, dp: DemoPool, stop: threading.Event) -> EngineReport:
    _say("ready")
    line = sys.stdin.readline().split()
    if len(line) != 2 or line[0] != "go":
        stop.set()
        t0 = time.monotonic()
    else:
        t0 = float(line[1])
    threading.Thread(target=_watch_stdin, args=(stop,), name="demo-stdin", daemon=True).start()
    workload = spec.workload
    stream = arrivals(workload, spec.num_steps)
    scheduler = Scheduler(workload, dp, dp.block_size)
    peak_mapped = max_lag = 0.0
    steps_run = 0
    for step in range(spec.num_steps):
        delay = t0 + step * workload.step_s - time.monotonic()
        if delay > 0 and stop.wait(delay):
            break
        if stop.is_set():
            break
        max_lag = max(max_lag, -delay)
        scheduler.step(step, stream[step])
        peak_mapped = max(peak_mapped, dp.pool.stats().mapped_bytes)
        steps_run = step + 1
    stats = scheduler.stats()
    scheduler.drain()
    return EngineReport(
        name=spec.name,
        num_steps=steps_run,
        block_bytes=dp.block_bytes,
        group_bytes=dp.group_bytes,
        blocks_per_page=dp.geometry.blocks_per_page,
        num_arrived=stats.num_arrived,
        num_started=stats.num_started,
        num_finished=stats.num_finished,
        num_waited=stats.num_waited,
        num_refused=stats.num_refused,
        num_preempted=stats.num_preempted,
        peak_used_bytes=stats.peak_blocks_used * dp.block_bytes,
        peak_mapped_bytes=int(peak_mapped),
        max_lag_s=round(max_lag, 3),
    )


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        sys.stderr.write("usage: python -m kvcached.demo.engine SPEC_JSON (started by `kvctl demo`)\n")
        return 2
    spec = EngineSpec.from_json(args[0])
    stop = threading.Event()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    report = run_engine(spec, stop)
    tmp = f"{spec.report_path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(report.to_json())
    os.replace(tmp, spec.report_path)
    _say("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
