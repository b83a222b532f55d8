"""The console script's entry: ``kvctl = "kvctl.main:app"``.

``app`` stands for the Typer application of :mod:`kvctl.cli`: every attribute is the
Typer app's (so ``CliRunner().invoke(app, ...)`` and other Typer tooling work), built on
first use. Calling it first looks for a *fast path*: argument lists that need no parsing
run their command directly, without importing Typer. That is what lets ``kvctl ls`` —
the command scripts run in loops — start in about the time it takes to import
``kvcached.control`` (importing Typer would cost as much again, and its parameter
handling imports pydantic). Everything else goes to Typer.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

from kvctl.errors import CliError, guard, take_segment

__all__ = ["app", "fast_path"]


def _ls(json_out: bool) -> Callable[[], None]:
    def run() -> None:
        from kvctl.listing import list_engines

        list_engines(json_out)

    return run


_FAST_PATHS: dict[tuple[str, ...], Callable[[], None]] = {("ls",): _ls(False), ("ls", "--json"): _ls(True)}


def fast_path(argv: Sequence[str]) -> Callable[[], None] | None:
    """The direct call for ``argv`` (``--segment`` already taken off), if it has one."""
    return _FAST_PATHS.get(tuple(argv))


class _App:
    """The Typer app, built on first attribute access; calling it tries the fast path."""

    def _typer(self) -> Any:
        from kvctl.cli import app as typer_app

        return typer_app

    def __getattr__(self, name: str) -> Any:
        return getattr(self._typer(), name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not args and not kwargs:
            argv = sys.argv[1:]
            try:
                fast = fast_path(take_segment(argv)[0])
            except CliError:
                fast = None  # let the full parser report it
            if fast is not None:
                sys.exit(guard(lambda _: fast(), argv))
        return self._typer()(*args, **kwargs)

    def __repr__(self) -> str:
        return "<kvctl app>"


app: Any = _App()
