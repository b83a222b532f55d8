"""``kvctl set NAME --weight W --min SIZE``: an engine's inputs to the rebalance policies."""

from __future__ import annotations

from typing import Annotated

import typer

from kvctl import ctl
from kvctl.errors import CliError
from kvctl.table import fmt_bytes

__all__ = ["set_engine"]


def set_engine(
    name: Annotated[str, typer.Argument(metavar="NAME", help="Engine name (see `kvctl ls`).")],
    weight: Annotated[
        float | None, typer.Option("--weight", metavar="W", help="Share weight (> 0) for demand/priority policies.")
    ] = None,
    min_size: Annotated[
        str | None, typer.Option("--min", metavar="SIZE|PCT", help="Least limit a policy may give it (512MiB, 10%).")
    ] = None,
) -> None:
    """Set an engine's weight and/or minimum for `kvctl rebalance`."""
    from kvcached.control import UnknownEngine

    if weight is None and min_size is None:
        raise CliError("nothing to set: give --weight W (a number > 0) and/or --min SIZE (512MiB, 10%)")
    if weight is not None and not 0 < weight < float("inf"):
        raise CliError(f"bad weight {weight:g}: allowed is a finite number > 0")
    if min_size is not None:
        ctl.check_size(min_size, "min", allow_none=False)
    with ctl.open_controller() as controller:
        try:
            if weight is not None:
                controller.set_weight(name, weight)
            if min_size is not None:
                controller.set_min(name, min_size)
            info = controller.snapshot().engine(name)
        except UnknownEngine:
            raise ctl.unknown_engine(name, controller.snapshot()) from None
    typer.echo(f"{name}: weight {info.weight:g}, min {fmt_bytes(info.min_bytes)}")
