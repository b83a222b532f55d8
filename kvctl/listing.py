"""What ``kvctl ls`` prints: a snapshot as text or JSON. Typer-free, so ``kvctl ls`` can run
without importing Typer at all (see :mod:`kvctl.main`)."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from kvctl import ctl
from kvctl.table import fmt_bytes, fmt_limit, render_table

if TYPE_CHECKING:
    from kvcached.control import EngineInfo, Snapshot

__all__ = ["STALE_HEARTBEAT_S", "engine_state", "list_engines", "render_ls"]

STALE_HEARTBEAT_S = 2.0


def engine_state(engine: EngineInfo) -> str:
    """The state word shown for an engine, with the conditions a user should notice."""
    state = engine.state.name.lower()
    if engine.heartbeat_age_s > STALE_HEARTBEAT_S:
        return f"{state},stalled"
    if engine.watch_error:
        return f"{state},error"
    if engine.at_share:
        return f"{state},at-share"
    return state


def render_ls(snapshot: Snapshot, segment: str) -> str:
    """The text ``kvctl ls`` prints."""
    gpu_rows = [
        [
            str(g.index),
            g.uuid,
            fmt_bytes(g.total_bytes),
            fmt_limit(g.budget_bytes),
            fmt_bytes(g.headroom_bytes),
            fmt_bytes(g.mapped_bytes),
            str(g.num_engines),
        ]
        for g in snapshot.gpus
    ]
    out = [f"segment {segment}"]
    if gpu_rows:
        out.append(
            render_table(
                ["GPU", "UUID", "TOTAL", "BUDGET", "HEADROOM", "MAPPED", "ENGINES"], gpu_rows, right=(0, 2, 3, 4, 5, 6)
            )
        )
    engines = sorted(snapshot.engines, key=lambda e: (e.gpu_index, e.name))
    if not engines:
        out.append("no engines registered")
        return "\n".join(out) + "\n"
    rows = []
    pending = False
    for e in engines:
        limit = fmt_limit(e.limit_bytes)
        if e.limit_pending:
            limit += "*"
            pending = True
        rows.append(
            [
                e.name,
                e.model,
                e.kind.name.lower(),
                str(e.gpu_index),
                str(e.pid),
                engine_state(e),
                fmt_bytes(e.used_bytes),
                fmt_bytes(e.cached_bytes),
                fmt_bytes(e.reserve_bytes),
                fmt_bytes(e.mapped_bytes),
                limit,
                fmt_bytes(e.demand_bytes),
            ]
        )
    headers = ["NAME", "MODEL", "KIND", "GPU", "PID", "STATE", "USED", "CACHED", "RESERVE", "MAPPED", "LIMIT", "DEMAND"]
    out.append("")
    out.append(render_table(headers, rows, right=(3, 4, 6, 7, 8, 9, 10, 11)))
    if pending:
        out.append("* limit set but not applied by the engine yet")
    return "\n".join(out) + "\n"


def list_engines(json_out: bool) -> None:
    """Snapshot the segment and print it (the body of ``kvctl ls``)."""
    with ctl.open_controller() as controller:
        snapshot = controller.snapshot()
        segment = controller.name
    if json_out:
        ctl.print_json(ctl.snapshot_json(snapshot, segment))
    else:
        sys.stdout.write(render_ls(snapshot, segment))
