"""Many real engine processes on the host backend sharing one segment and one budget."""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import random
import signal
import time
from collections.abc import Iterator

import pytest
from control_helpers import PAGE_BYTES, churn_engine, idle_engine, mapping_engine

from kvcached.control import Controller

pytestmark = pytest.mark.multiproc

NUM_ENGINES = 8
ctx = mp.get_context("spawn")


class Fleet:
    """Spawned engine processes, a queue they report on, and an event that stops them."""

    def __init__(self) -> None:
        self.report = ctx.Queue()
        self.go = ctx.Event()
        self.stop = ctx.Event()
        self.procs: list[mp.process.BaseProcess] = []

    def start(self, target: object, *args: object) -> None:
        proc = ctx.Process(target=target, args=args, daemon=True)
        proc.start()
        self.procs.append(proc)

    def collect(self, count: int, timeout_s: float = 60) -> list[tuple]:
        """``count`` reports; fails at once, naming it, if an engine process died."""
        reports: list[tuple] = []
        deadline = time.monotonic() + timeout_s
        while len(reports) < count:
            try:
                reports.append(self.report.get(timeout=0.1))
                continue
            except queue.Empty:
                pass
            dead = [(p.name, p.exitcode) for p in self.procs if p.exitcode not in (None, 0, -signal.SIGKILL)]
            assert not dead, f"engine processes died: {dead}"
            assert time.monotonic() < deadline, f"{len(reports)} of {count} reports after {timeout_s} s"
        return reports

    def close(self) -> None:
        self.stop.set()
        for proc in self.procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()


@pytest.fixture
def fleet() -> Iterator[Fleet]:
    f = Fleet()
    yield f
    f.close()


def _exact(ctl: Controller) -> tuple[int, int]:
    """(GPU mapped sum, sum of the live slots' mapped bytes) after reclaiming the dead."""
    snap = ctl.snapshot()
    (gpu,) = snap.gpus
    return gpu.mapped_bytes, sum(e.mapped_bytes for e in snap.engines)


def test_idle_engines_follow_limits_set_from_another_process(
    shm_name: str, controller: Controller, fleet: Fleet
) -> None:
    for i in range(NUM_ENGINES):
        fleet.start(idle_engine, shm_name, f"e{i}", 2, 2, fleet.report, fleet.stop)
    assert sorted(fleet.collect(NUM_ENGINES)) == [(f"e{i}", 2) for i in range(NUM_ENGINES)]
    deadline = time.monotonic() + 10  # the reserves (2 pages each) fill in the background
    while _exact(controller) != (NUM_ENGINES * 4 * PAGE_BYTES,) * 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _exact(controller) == (NUM_ENGINES * 4 * PAGE_BYTES,) * 2

    revisions = {f"e{i}": controller.set_limit(f"e{i}", 2 * PAGE_BYTES) for i in range(NUM_ENGINES)}
    start = time.monotonic()
    for name, revision in revisions.items():
        assert controller.wait_applied(name, revision, timeout_s=1.0)
    assert time.monotonic() - start < 0.1  # all eight applied, idle, within 100 ms
    deadline = time.monotonic() + 2
    while _exact(controller)[0] != NUM_ENGINES * 2 * PAGE_BYTES and time.monotonic() < deadline:
        time.sleep(0.005)
    assert _exact(controller) == (NUM_ENGINES * 2 * PAGE_BYTES,) * 2  # every reserve unmapped
    assert all(e.limit_met and e.applied_limit_bytes == 2 * PAGE_BYTES for e in controller.snapshot().engines)

    fleet.stop.set()
    assert sorted(fleet.collect(NUM_ENGINES)) == [(f"e{i}", 2 * PAGE_BYTES) for i in range(NUM_ENGINES)]
    for proc in fleet.procs:
        proc.join(10)
    assert controller.snapshot().engines == [] and _exact(controller) == (0, 0)


def test_sigkill_mid_mapping_leaves_exact_totals(shm_name: str, controller: Controller, fleet: Fleet) -> None:
    for i in range(2):
        fleet.start(idle_engine, shm_name, f"idle{i}", 3, 0, fleet.report, fleet.stop)
    fleet.collect(2)
    rng = random.Random(4)
    bytes_at_death = []
    for round_ in range(5):
        fleet.start(mapping_engine, shm_name, f"mapper{round_}", fleet.report)
        ((_, pid),) = fleet.collect(1)
        time.sleep(rng.uniform(0.02, 0.15))
        os.kill(pid, signal.SIGKILL)
        fleet.procs[-1].join(10)
        (slot,) = [s for s in controller.segment.slots if s.name == f"mapper{round_}".encode()]
        bytes_at_death.append(slot.mapped_bytes)
        assert controller.reclaim_dead() == [f"mapper{round_}"]
        assert _exact(controller) == (2 * 3 * PAGE_BYTES,) * 2
    assert any(bytes_at_death), "no kill landed while the engine held mapped bytes"


def test_stress_under_a_budget_has_zero_drift(shm_name: str, controller: Controller, fleet: Fleet) -> None:
    for i in range(NUM_ENGINES):
        fleet.start(churn_engine, shm_name, f"c{i}", 2.0, i, fleet.report, fleet.go, fleet.stop)
    fleet.collect(NUM_ENGINES)
    budget_bytes = 20 * PAGE_BYTES  # well under what eight churning engines ask for
    controller.set_budget(0, budget_bytes)
    fleet.go.set()
    results = fleet.collect(NUM_ENGINES)
    arena_bytes = {name: mapped for name, mapped, _ in results}
    snap = controller.snapshot()
    assert {e.name: e.mapped_bytes for e in snap.engines} == arena_bytes
    assert snap.gpus[0].mapped_bytes == sum(arena_bytes.values()) <= budget_bytes
    assert sum(denied for _, _, denied in results) > 0  # the budget did bite
    fleet.close()
    assert _exact(controller) == (0, 0)
