"""``kvctl rebalance``: recompute every engine's limit with a policy, once or on an interval."""

from __future__ import annotations

import enum
import time
from typing import TYPE_CHECKING, Annotated

import typer

from kvctl import ctl
from kvctl.table import fmt_bytes, fmt_limit, render_table

if TYPE_CHECKING:
    from kvcached.control import Controller, LimitChange, Snapshot

__all__ = ["Policy", "rebalance", "render_changes"]


class Policy(str, enum.Enum):
    demand = "demand"
    equal = "equal"
    priority = "priority"


def render_changes(before: Snapshot, changes: list[LimitChange], dry_run: bool) -> str:
    """Every engine with its old and new limit (``=`` where the policy keeps it)."""
    new = {c.name: c.new_limit_bytes for c in changes}
    rows = []
    for e in sorted(before.engines, key=lambda e: (e.gpu_index, e.name)):
        after = fmt_limit(new[e.name]) if e.name in new else "="
        rows.append(
            [
                e.name,
                str(e.gpu_index),
                fmt_bytes(e.mapped_bytes),
                fmt_bytes(e.demand_bytes),
                f"{e.weight:g}",
                fmt_limit(e.limit_bytes),
                after,
            ]
        )
    table = render_table(
        ["NAME", "GPU", "MAPPED", "DEMAND", "WEIGHT", "OLD LIMIT", "NEW LIMIT"], rows, right=(1, 2, 3, 4, 5, 6)
    )
    verb = "would change" if dry_run else "changed"
    return f"{table}\n{len(changes)} limit(s) {verb}{' (dry run: nothing set)' if dry_run else ''}\n"


def _changes_json(changes: list[LimitChange], dry_run: bool) -> dict[str, object]:
    return {
        "dry_run": dry_run,
        "changes": [
            {
                "name": c.name,
                "gpu_uuid": c.gpu_uuid,
                "old_limit_bytes": c.old_limit_bytes,
                "new_limit_bytes": c.new_limit_bytes,
            }
            for c in changes
        ],
    }


def _once(controller: Controller, policy: Policy, dry_run: bool) -> tuple[Snapshot, list[LimitChange]]:
    before = controller.snapshot()
    return before, controller.rebalance(policy.value, dry_run=dry_run)


def rebalance(
    policy: Annotated[
        Policy,
        typer.Option(
            "--policy", help="demand: by demand, weight and min; equal: the same for all; priority: by weight."
        ),
    ] = Policy.demand,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show the new limits without setting them.")] = False,
    watch: Annotated[
        bool, typer.Option("--watch", help="Keep rebalancing every --interval seconds until Ctrl-C.")
    ] = False,
    interval: Annotated[
        float, typer.Option("--interval", min=0.05, metavar="S", help="Seconds between rounds with --watch.")
    ] = 1.0,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print the changes as JSON (one object per round with --watch).")
    ] = False,
) -> None:
    """Recompute limits with a policy and show the old and new limit of every engine."""
    with ctl.open_controller() as controller:
        before, changes = _once(controller, policy, dry_run)
        if json_out:
            ctl.print_json(_changes_json(changes, dry_run))
        else:
            typer.echo(render_changes(before, changes, dry_run), nl=False)
        if not watch:
            return
        try:
            while True:
                time.sleep(interval)
                before, changes = _once(controller, policy, dry_run)
                stamp = time.strftime("%H:%M:%S")
                if json_out:
                    ctl.print_json({"time": stamp, **_changes_json(changes, dry_run)})
                    continue
                old = {e.name: e.limit_bytes for e in before.engines}
                for c in changes:
                    typer.echo(f"{stamp}  {c.name}: {fmt_limit(old.get(c.name))} -> {fmt_limit(c.new_limit_bytes)}")
        except KeyboardInterrupt:
            return
