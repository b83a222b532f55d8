"""``kvctl budget GPU SIZE|PCT|none``: cap what all kvcached engines on a GPU may map together."""

from __future__ import annotations

from typing import Annotated

import typer

from kvctl import ctl
from kvctl.errors import CliError
from kvctl.table import fmt_bytes, fmt_limit

__all__ = ["budget"]


def budget(
    gpu: Annotated[str, typer.Argument(metavar="GPU", help="GPU entry index or UUID (prefix), as `kvctl ls` shows.")],
    size: Annotated[
        str, typer.Argument(metavar="SIZE|PCT|none", help="512MiB, 12G, 80% (of the GPU's total) or none.")
    ],
) -> None:
    """Set the budget of a GPU: maps beyond it are refused from the next map on."""
    from kvcached.control import UnknownGpu

    ctl.check_size(size, "budget")
    key: str | int = int(gpu) if gpu.isdigit() else gpu
    with ctl.open_controller() as controller:
        snapshot = controller.snapshot()
        try:
            entry = snapshot.gpu(key)
        except UnknownGpu:
            known = ", ".join(f"{g.index} ({g.uuid})" for g in snapshot.gpus) or "none yet"
            raise CliError(f"no single GPU entry matches {gpu!r} (GPU entries: {known})") from None
        controller.set_budget(entry.index, size)
        after = controller.snapshot().gpu(entry.index)
    typer.echo(
        f"GPU {after.index} ({after.uuid}): budget {fmt_limit(entry.budget_bytes)} -> {fmt_limit(after.budget_bytes)}"
    )
    if after.budget_bytes is not None and after.mapped_bytes > after.budget_bytes:
        typer.echo(
            f"note: engines map {fmt_bytes(after.mapped_bytes)} now; memory already mapped stays until they free it "
            "(lower their limits or run `kvctl rebalance` to shrink them)"
        )
