"""The Typer application: one module per command, registered here.

Command modules import only typer at the top; the library, rich and anything heavy are
imported inside the command that needs them, and only ``demo`` and ``doctor`` ever
touch the compiled core. The console script enters through :mod:`kvctl.main`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import typer
from typer.core import TyperGroup

from kvctl import budget, demo, doctor, launch, limit, ls, rebalance, set_engine, top
from kvctl.errors import guard

__all__ = ["KvctlGroup", "app"]


class KvctlGroup(TyperGroup):
    """The ``kvctl`` command group: ``--segment`` taken off argv, the fast path for
    ``ls``, and every error in one line (see :mod:`kvctl.errors`)."""

    def main(  # type: ignore[override]
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        from kvctl.main import fast_path

        def call(argv: list[str]) -> Any:
            fast = fast_path(argv)
            if fast is not None:
                fast()
                return 0
            return super(KvctlGroup, self).main(argv, prog_name, complete_var, standalone_mode=False, **extra)

        code = guard(call, sys.argv[1:] if args is None else args)
        if not standalone_mode:
            return code
        sys.exit(code)


app = typer.Typer(
    name="kvctl",
    cls=KvctlGroup,
    help=(
        "Inspect, cap and rebalance the KV cache memory of live LLM engines (kvcached).\n\n"
        "Global option, before the command: --segment NAME picks the control segment "
        "(default: KVCACHED_SHM_NAME, else one per user)."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

app.command("ls")(ls.ls)
app.command("top")(top.top)
app.command("limit")(limit.limit)
app.command("budget")(budget.budget)
app.command("set")(set_engine.set_engine)
app.command("rebalance")(rebalance.rebalance)
app.command("launch", context_settings={"allow_interspersed_args": False})(launch.launch)
app.command("doctor")(doctor.doctor)
app.command("demo")(demo.demo)
