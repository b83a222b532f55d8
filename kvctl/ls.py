"""``kvctl ls``: every GPU entry and engine of the segment, once."""

from __future__ import annotations

from typing import Annotated

import typer

__all__ = ["ls"]


def ls(
    json_out: Annotated[bool, typer.Option("--json", help="Print the snapshot as JSON.")] = False,
) -> None:
    """List every engine: model, kind, GPU, pid, used/cached/reserve/mapped/limit bytes, demand, state; and each GPU's total, budget and mapped bytes."""
    from kvctl.listing import list_engines

    list_engines(json_out)
