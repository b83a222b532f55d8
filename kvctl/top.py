"""``kvctl top``: live view of the engines' KV memory (snapshot → history → frame).

On a terminal: a full-screen view refreshed every ``--interval``, keys ``s`` (sort by
the next column), ``r`` (reverse), ``q`` (quit). ``--once``: one frame (sampled over a
short window so rates mean something) for pipes. Not a terminal and not ``--once``:
one frame per interval, appended, like ``top -b``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

import typer

from kvctl import ctl
from kvctl.errors import CliError

if TYPE_CHECKING:
    from rich.console import Console, RenderableType

    from kvcached.control import Controller, Snapshot
    from kvctl.history import History

__all__ = ["ViewState", "make_console", "run_live", "top"]

_SORTS = ("mapped", "name", "used", "demand", "allocs")
_ONCE_SAMPLES = 5


@dataclass
class ViewState:
    """What the keys change."""

    sort: str = "mapped"
    reverse: bool = True
    quit: bool = False

    def on_key(self, key: str) -> None:
        if key in ("q", "Q"):
            self.quit = True
        elif key == "s":
            self.sort = _SORTS[(_SORTS.index(self.sort) + 1) % len(_SORTS)]
        elif key == "r":
            self.reverse = not self.reverse

    @property
    def footer(self) -> str:
        return f"q quit   s sort ({self.sort})   r reverse"


def make_console() -> Console:
    from rich.console import Console

    return Console(highlight=False)


def run_live(
    console: Console,
    interval_s: float,
    tick: Callable[[], bool],
    frame: Callable[[ViewState], RenderableType],
    state: ViewState,
) -> None:
    """Full-screen loop: ``tick()`` (False ends it) then draw ``frame(state)`` every
    ``interval_s``; keys redraw at once. Ends on ``q`` or Ctrl-C; the terminal is restored."""
    from rich.live import Live

    from kvctl.keys import KeyReader, stop_on_term

    with (
        stop_on_term(),
        KeyReader() as keys,
        Live(console=console, screen=True, auto_refresh=False, transient=True) as live,
    ):
        try:
            while not state.quit:
                if not tick():
                    return
                live.update(frame(state), refresh=True)
                deadline = time.monotonic() + interval_s
                while not state.quit and (left := deadline - time.monotonic()) > 0:
                    key = keys.read(left)
                    if key:
                        state.on_key(key)
                        live.update(frame(state), refresh=True)
        except KeyboardInterrupt:
            return


class _Source:
    """Snapshots of the segment, opening it once it exists (live modes wait for it)."""

    def __init__(self, history: History) -> None:
        self.history = history
        self.controller: Controller | None = None
        self.snapshot: Snapshot | None = None
        self.missing: str | None = None

    def tick(self) -> bool:
        from kvcached.control import SegmentMissing

        if self.controller is None:
            try:
                self.controller = ctl.open_controller()
            except SegmentMissing as exc:
                self.missing = str(exc)
                return True
            self.missing = None
        self.snapshot = self.controller.snapshot()
        self.history.update(self.snapshot)
        return True

    def frame(self, state: ViewState, width: int, keys: bool = True) -> RenderableType:
        from rich.text import Text

        from kvctl.view import render_frame

        if self.snapshot is None:
            return Text(f"kvctl top: waiting for engines: {self.missing or 'no snapshot yet'} (q quits)")
        return render_frame(
            self.snapshot,
            self.history,
            segment=ctl.segment_name(),
            width=width,
            sort=state.sort,
            reverse=state.reverse,
            footer=state.footer if keys else None,
        )

    def close(self) -> None:
        if self.controller is not None:
            self.controller.close()


def _json_with_rates(source: _Source) -> dict[str, Any]:
    assert source.snapshot is not None
    out = ctl.snapshot_json(source.snapshot, ctl.segment_name())
    for row, engine in zip(out["engines"], source.snapshot.engines, strict=True):
        rates = source.history.rates(engine)
        row["allocs_per_s"] = round(rates.allocs_per_s, 3)
        row["denied_per_s"] = round(rates.denied_per_s, 3)
    return out


def top(
    interval: Annotated[
        float, typer.Option("--interval", min=0.1, metavar="S", help="Seconds between refreshes.")
    ] = 1.0,
    once: Annotated[bool, typer.Option("--once", help="Print one frame and exit (for pipes and scripts).")] = False,
    sort: Annotated[
        str, typer.Option("--sort", help="Sort engines by mapped, name, used, demand or allocs.")
    ] = "mapped",
    json_out: Annotated[
        bool, typer.Option("--json", help="Print one sample as JSON, with rates (implies --once).")
    ] = False,
) -> None:
    """Live view of every engine's KV memory: per-GPU budget split, per-engine bars, rates and history."""
    from kvctl.history import History

    if sort not in _SORTS:
        raise CliError(f"unknown sort key {sort!r}: allowed are {', '.join(_SORTS)}")
    state = ViewState(sort=sort)
    source = _Source(History())
    try:
        if once or json_out:
            source.controller = ctl.open_controller()  # a missing segment is an error here
            gap_s = min(interval, 0.5) / (_ONCE_SAMPLES - 1)
            for i in range(_ONCE_SAMPLES):
                if i:
                    time.sleep(gap_s)
                source.tick()
            if json_out:
                ctl.print_json(_json_with_rates(source))
                return
            console = make_console()
            console.print(source.frame(state, console.width, keys=False))
            return
        console = make_console()
        if console.is_terminal:
            run_live(console, interval, source.tick, lambda s: source.frame(s, console.width), state)
            return
        try:
            while True:
                source.tick()
                console.print(source.frame(state, console.width, keys=False))
                console.print()
                time.sleep(interval)
        except KeyboardInterrupt:
            return
    finally:
        source.close()
