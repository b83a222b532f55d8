"""``kvctl limit NAME SIZE|PCT|none``: cap one engine's KV memory and wait until it applies."""

from __future__ import annotations

import time
from typing import Annotated

import typer

from kvctl import ctl
from kvctl.errors import CliError
from kvctl.table import fmt_bytes, fmt_limit

__all__ = ["limit"]


def limit(
    name: Annotated[str, typer.Argument(metavar="NAME", help="Engine name (see `kvctl ls`).")],
    size: Annotated[
        str, typer.Argument(metavar="SIZE|PCT|none", help="512MiB, 12G, 30% (of the engine's GPU) or none.")
    ],
    wait: Annotated[
        float,
        typer.Option("--wait", min=0, metavar="S", help="Seconds to wait for the engine to apply it (0: do not wait)."),
    ] = 2.0,
) -> None:
    """Set an engine's KV limit, print the revision, and wait (bounded) until the engine applied it."""
    from kvcached.control import UnknownEngine

    ctl.check_size(size, "limit")
    with ctl.open_controller() as controller:
        try:
            old = controller.snapshot().engine(name).limit_bytes
            revision = controller.set_limit(name, size)
            new = controller.snapshot().engine(name).limit_bytes
        except UnknownEngine:
            raise ctl.unknown_engine(name, controller.snapshot()) from None
        typer.echo(f"{name}: limit {fmt_limit(old)} -> {fmt_limit(new)} (revision {revision})")
        if wait == 0:
            return
        start = time.monotonic()
        try:
            applied = controller.wait_applied(name, revision, wait)
        except UnknownEngine:
            raise CliError(f"engine {name!r} exited before applying revision {revision}") from None
        if not applied:
            raise CliError(
                f"{name} has not applied revision {revision} within {wait:g} s "
                "(it may be busy or stuck; `kvctl ls` shows its state, --wait waits longer)"
            )
        took_ms = (time.monotonic() - start) * 1000
        info = controller.snapshot().engine(name)
    if info.limit_met:
        typer.echo(f"{name}: applied in {took_ms:.0f} ms, maps {fmt_bytes(info.mapped_bytes)}")
    else:
        typer.echo(
            f"{name}: applied in {took_ms:.0f} ms; live blocks keep it at {fmt_bytes(info.mapped_bytes)}, "
            "so it grants no new blocks until it is under the limit"
        )
