"""``kvctl demo``: several engines with real KV pools share one budget; watch memory move.

The engines, their request streams and the closing comparison live in
``kvcached.demo``; this module shows them: ``top`` full-screen on a terminal (``q`` ends
the demo early), a line per interval otherwise, then the summary. Ctrl-C, ``q`` or the
end of ``--duration`` all stop the engines cleanly and remove the demo's segment.
"""

from __future__ import annotations

import enum
import time
from typing import TYPE_CHECKING, Annotated

import typer

from kvctl.errors import CliError
from kvctl.keys import stop_on_term

if TYPE_CHECKING:
    from rich.console import Console, RenderableType

    from kvcached.control import Snapshot
    from kvcached.demo.runner import DemoRun
    from kvcached.demo.summary import DemoSummary
    from kvctl.history import History
    from kvctl.top import ViewState

__all__ = ["demo", "render_summary", "status_line"]


class Backend(str, enum.Enum):
    host = "host"
    cuda = "cuda"


def status_line(elapsed_s: float, snapshot: Snapshot, history: History) -> str:
    """One line per interval when the output is not a terminal."""
    from kvcached.control import format_bytes as fb

    gpus = "  ".join(f"GPU {g.index} {fb(g.mapped_bytes)} of {fb(g.capacity_bytes)}" for g in snapshot.gpus)
    engines = []
    for e in sorted(snapshot.engines, key=lambda e: e.name):
        short = max(e.demand_bytes - e.used_bytes, 0)
        denied = history.rates(e).denied_per_s
        text = f"{e.name} {fb(e.mapped_bytes)} (used {fb(e.used_bytes)}"
        text += f", short {fb(short)}, {denied:.0f} denied/s)" if short or denied else ")"
        engines.append(text)
    return f"[{elapsed_s:5.1f}s] {gpus} | " + " | ".join(engines)


def render_summary(summary: DemoSummary) -> RenderableType:
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    from kvcached.control import format_bytes as fb

    n = len(summary.engines)
    share = summary.engines[0].static_share_bytes if summary.engines else 0
    table = Table(box=None, header_style="bold", pad_edge=False, padding=(0, 1))
    table.add_column("ENGINE", no_wrap=True)
    for name in ("REQS", "PEAK NEED", "PEAK MAPPED", "STATIC SHARE", "SHARED w/r", "STATIC w/r"):
        table.add_column(name, justify="right", no_wrap=True)
    for e in summary.engines:
        table.add_row(
            e.name,
            str(e.num_requests),
            fb(e.peak_need_bytes),
            fb(e.peak_mapped_bytes),
            fb(e.static_share_bytes),
            f"{e.elastic_waited} / {e.elastic_refused}",
            f"{e.static_waited} / {e.static_refused}",
        )
    total = sum(e.num_requests for e in summary.engines)
    table.add_row(
        Text("total", style="bold"),
        str(total),
        fb(summary.sum_peak_need_bytes),
        "",
        fb(summary.budget_bytes),
        Text(f"{summary.elastic_waited} / {summary.elastic_refused}", style="bold green"),
        Text(
            f"{summary.static_waited} / {summary.static_refused}", style="bold red" if summary.static_waited else "bold"
        ),
    )
    over = summary.sum_peak_need_bytes > summary.budget_bytes
    verdict = (
        f"A static split of the same {fb(summary.budget_bytes)} ({fb(share)} each) would have made "
        f"{summary.static_waited} of {total} requests wait and refused {summary.static_refused}; "
        f"sharing it elastically made {summary.elastic_waited} wait and refused {summary.elastic_refused}."
    )
    if over:
        verdict += (
            f" Reserving every engine's own peak statically would take {fb(summary.sum_peak_need_bytes)}, "
            f"{summary.sum_peak_need_bytes / summary.budget_bytes:.2f}x the budget."
        )
    title = Text(
        f"kvctl demo: {summary.duration_s:.1f} s, {n} engines sharing a budget of {fb(summary.budget_bytes)}",
        style="bold",
    )
    legend = Text("w/r: requests that waited for memory / were refused after waiting too long", style="dim")
    return Group(Text(), title, table, legend, Text(), Text(verdict))


def _live(run: DemoRun, console: Console, interval_s: float, history: History, state: ViewState) -> None:
    from kvctl.top import run_live
    from kvctl.view import render_frame

    latest: list[Snapshot] = []

    def tick() -> bool:
        run.check()
        if run.finished:
            return False
        assert run.controller is not None
        latest[:] = [run.controller.snapshot()]
        history.update(latest[0])
        return True

    def frame(s: ViewState) -> RenderableType:
        cfg = run.config
        footer = f"{run.elapsed_s:4.0f} s of {cfg.duration_s:g} s   q ends the demo   s sort ({s.sort})   r reverse"
        return render_frame(
            latest[0],
            history,
            segment=run.shm_name,
            width=console.width,
            sort=s.sort,
            reverse=s.reverse,
            title="kvctl demo",
            footer=footer,
        )

    run_live(console, interval_s, tick, frame, state)


def _lines(run: DemoRun, interval_s: float, history: History) -> None:
    assert run.controller is not None
    next_at = time.monotonic()
    while not run.finished:
        run.check()
        snapshot = run.controller.snapshot()
        history.update(snapshot)
        typer.echo(status_line(run.elapsed_s, snapshot, history))
        next_at += interval_s
        time.sleep(max(next_at - time.monotonic(), 0.0))


def demo(
    engines: Annotated[
        int, typer.Option("--engines", min=1, max=16, help="How many demo engines share the budget.")
    ] = 3,
    duration: Annotated[float, typer.Option("--duration", min=1, metavar="S", help="Seconds the demo runs.")] = 30.0,
    backend: Annotated[
        Backend, typer.Option("--backend", help="host: real OS virtual memory; cuda: GPU 0.")
    ] = Backend.host,
    budget: Annotated[
        str | None,
        typer.Option("--budget", metavar="SIZE", help="Shared budget (default: 288MiB + 32MiB per engine)."),
    ] = None,
    tensors: Annotated[
        bool, typer.Option("--tensors", help="Use torch KVPools (needs torch; slower to start).")
    ] = False,
    interval: Annotated[
        float | None,
        typer.Option("--interval", min=0.1, metavar="S", help="Seconds between refreshes (0.5) or lines (1)."),
    ] = None,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print the closing summary as JSON instead of tables.")
    ] = False,
) -> None:
    """Run N demo engines with bursty, staggered load on one shared budget; end with elastic vs static."""
    from kvcached.control import SizeError, format_bytes, parse_size
    from kvcached.demo.runner import DemoConfig, DemoError, DemoRun
    from kvcached.demo.summary import summarize
    from kvctl import ctl
    from kvctl.history import History
    from kvctl.top import ViewState, make_console

    try:
        budget_bytes = None if budget is None else parse_size(budget)
    except SizeError as exc:
        raise CliError(
            f"bad budget {budget!r}: {str(exc).split(': expected')[0]}; allowed: a size like 512MiB or 2G"
        ) from None
    if budget_bytes is not None and budget_bytes < 64 << 20:
        raise CliError(f"budget {format_bytes(budget_bytes)} is too small for the demo: give at least 64MiB")
    if backend is Backend.cuda:
        from kvcached import vmm

        reason = vmm.backend_status().get("cuda", "not built")
        if reason != "ok":
            raise CliError(f"the cuda backend is not usable here: {reason} (use --backend host)")
    if tensors:
        from kvcached.integrations.versions import installed_version

        if installed_version("torch") is None:
            raise CliError("--tensors needs torch, which is not installed (pip install torch, or drop --tensors)")
    config = DemoConfig(
        num_engines=engines, duration_s=duration, budget_bytes=budget_bytes, backend=backend.value, tensors=tensors
    )
    console = make_console()
    history = History(length=40)
    state = ViewState()
    with DemoRun(config) as run, stop_on_term():
        if not json_out:
            typer.echo(
                f"kvctl demo: {engines} engines, budget {format_bytes(config.budget)}, {duration:g} s, segment {run.shm_name}"
            )
            typer.echo(f"(watch it from another terminal: kvctl --segment {run.shm_name} top)")
        try:
            try:
                run.start()
                if json_out:
                    while not run.finished:
                        run.check()
                        time.sleep(0.2)
                elif console.is_terminal:
                    _live(run, console, interval or 0.5, history, state)
                else:
                    _lines(run, interval or 1.0, history)
            except KeyboardInterrupt:
                pass
            reports = run.stop()
        except DemoError as exc:
            raise CliError(f"demo failed: {exc}") from None
    summary = summarize(run.specs, reports, config.budget)
    if json_out:
        ctl.print_json(
            {
                "budget_bytes": summary.budget_bytes,
                "duration_s": summary.duration_s,
                "engines": [e._asdict() for e in summary.engines],
            }
        )
    else:
        console.print(render_summary(summary))
