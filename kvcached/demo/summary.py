"""The demo's closing comparison: shared elastic budget versus a static split.

For each engine the same request stream (same seed, same number of steps) is replayed
twice through the same scheduler: once with no limit, which gives what the engine needed
at its peak, and once with a fixed share of the budget (budget / N, in whole page
groups, as a statically partitioned deployment would give it), which gives the requests
that would have waited or been refused. The live run's own counts are the elastic side.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from kvcached.demo.engine import EngineReport, EngineSpec
from kvcached.demo.scheduler import Scheduler, SchedulerStats, StaticBlocks
from kvcached.demo.workload import arrivals

__all__ = ["DemoSummary", "EngineSummary", "replay", "summarize"]


class EngineSummary(NamedTuple):
    name: str
    num_requests: int
    peak_need_bytes: int  # KV the engine held at its peak with no limit at all
    peak_mapped_bytes: int  # what it mapped at most in the live run (elastic)
    static_share_bytes: int  # budget / N, in whole page groups
    elastic_waited: int
    elastic_refused: int
    static_waited: int
    static_refused: int


class DemoSummary(NamedTuple):
    budget_bytes: int
    duration_s: float  # steps run x step length (the shortest engine's)
    engines: list[EngineSummary]

    @property
    def sum_peak_need_bytes(self) -> int:
        """What a static split would need so that every engine gets its own peak."""
        return sum(e.peak_need_bytes for e in self.engines)

    @property
    def elastic_waited(self) -> int:
        return sum(e.elastic_waited for e in self.engines)

    @property
    def elastic_refused(self) -> int:
        return sum(e.elastic_refused for e in self.engines)

    @property
    def static_waited(self) -> int:
        return sum(e.static_waited for e in self.engines)

    @property
    def static_refused(self) -> int:
        return sum(e.static_refused for e in self.engines)


def replay(spec: EngineSpec, num_steps: int, num_blocks: int | None) -> SchedulerStats:
    """Run ``spec``'s stream for ``num_steps`` steps over ``num_blocks`` blocks (None: unlimited)."""
    stream = arrivals(spec.workload, num_steps)
    scheduler = Scheduler(spec.workload, StaticBlocks(num_blocks), spec.shape.block_size)
    for step in range(num_steps):
        scheduler.step(step, stream[step])
    return scheduler.stats()


def summarize(specs: Sequence[EngineSpec], reports: Sequence[EngineReport], budget_bytes: int) -> DemoSummary:
    """Compare each engine's live run with its replays (see the module doc)."""
    rows = []
    share_bytes = budget_bytes // max(len(specs), 1)
    for spec, report in zip(specs, reports, strict=True):
        share_pages = share_bytes // report.group_bytes
        share_blocks = max(share_pages * report.blocks_per_page - 1, 0)  # block 0 is pinned
        unlimited = replay(spec, report.num_steps, None)
        static = replay(spec, report.num_steps, share_blocks)
        rows.append(
            EngineSummary(
                name=report.name,
                num_requests=report.num_arrived,
                peak_need_bytes=unlimited.peak_blocks_used * report.block_bytes,
                peak_mapped_bytes=report.peak_mapped_bytes,
                static_share_bytes=share_pages * report.group_bytes,
                elastic_waited=report.num_waited,
                elastic_refused=report.num_refused,
                static_waited=static.num_waited,
                static_refused=static.num_refused,
            )
        )
    num_steps = min((r.num_steps for r in reports), default=0)
    step_s = specs[0].workload.step_s if specs else 0.0
    return DemoSummary(budget_bytes=budget_bytes, duration_s=num_steps * step_s, engines=rows)
