"""``top``'s picture: snapshot + history in, a rich renderable out. No I/O here.

Per GPU: a budget bar split by engine (each engine its colour and glyph, so the split
reads without colour too) and a legend. Per engine: a bar of used (solid) and mapped
(shaded) memory on the GPU's scale with its limit marked ``┃``, the numbers, alloc and
denial rates, and a sparkline of mapped memory.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from kvctl.listing import engine_state
from kvctl.table import fmt_bytes, fmt_limit

if TYPE_CHECKING:
    from kvcached.control import EngineInfo, GpuInfo, Snapshot
    from kvctl.history import History

__all__ = ["render_frame", "sort_engines", "sparkline", "split_bar"]

PALETTE = ("cyan", "magenta", "green", "yellow", "blue", "red", "bright_cyan", "bright_magenta")
GLYPHS = "█▓▒#%=+*"
SPARK = " ▁▂▃▄▅▆▇█"
FREE = "·"


def _look(engine: EngineInfo) -> tuple[str, str]:
    return PALETTE[engine.slot % len(PALETTE)], GLYPHS[engine.slot % len(GLYPHS)]


def _cells(values: Sequence[int], total: int, width: int) -> list[int]:
    """Cells per value on a bar of ``width`` cells for ``total`` (largest remainder)."""
    if total <= 0 or width <= 0:
        return [0] * len(values)
    exact = [v * width / total for v in values]
    cells = [int(x) for x in exact]
    room = min(width, round(sum(exact))) - sum(cells)
    for i in sorted(range(len(values)), key=lambda i: exact[i] - cells[i], reverse=True)[: max(room, 0)]:
        cells[i] += 1
    return cells


def split_bar(parts: Sequence[tuple[int, str, str]], total: int, width: int) -> Text:
    """A bar of ``(bytes, style, glyph)`` parts on a scale of ``total``; the rest is free.
    Parts beyond ``total`` are squeezed to fit and the bar ends in ``!``."""
    over = sum(p[0] for p in parts) > total
    scale = max(sum(p[0] for p in parts), 1) if over else total
    cells = _cells([p[0] for p in parts], scale, width - 1 if over else width)
    bar = Text()
    for (_, style, glyph), n in zip(parts, cells, strict=True):
        bar.append(glyph * n, style=style)
    bar.append(FREE * (width - bar.cell_len - (1 if over else 0)), style="dim")
    if over:
        bar.append("!", style="bold red")
    return bar


def sparkline(values: Sequence[int], scale: int, width: int) -> str:
    """The last ``width`` values as block characters, 0..``scale``."""
    out = []
    for v in list(values)[-width:]:
        level = 0 if scale <= 0 or v <= 0 else max(1, min(8, round(8 * v / scale)))
        out.append(SPARK[level])
    return "".join(out).rjust(width)


def sort_engines(engines: Sequence[EngineInfo], history: History, key: str, reverse: bool) -> list[EngineInfo]:
    keys = {
        "name": lambda e: e.name,
        "mapped": lambda e: e.mapped_bytes,
        "used": lambda e: e.used_bytes,
        "demand": lambda e: e.demand_bytes,
        "allocs": lambda e: history.rates(e).allocs_per_s,
    }
    return sorted(engines, key=keys[key], reverse=reverse if key != "name" else not reverse)


def _gpu_block(gpu: GpuInfo, engines: list[EngineInfo], width: int) -> RenderableType:
    capacity = gpu.capacity_bytes
    used_pct = 100 * gpu.mapped_bytes / capacity if capacity else 0.0
    limit_word = "budget" if gpu.budget_bytes is not None else "capacity"
    head = Text.assemble(
        (f"GPU {gpu.index} ", "bold"),
        (gpu.uuid[:24] + ("…" if len(gpu.uuid) > 24 else ""), "dim"),
        f"   {limit_word} {fmt_bytes(capacity)}   mapped ",
        (f"{fmt_bytes(gpu.mapped_bytes)} ({used_pct:.0f}%)", "bold red" if used_pct > 95 else "bold"),
        f"   free {fmt_bytes(max(capacity - gpu.mapped_bytes, 0))}   engines {len(engines)}",
    )
    ordered = sorted(engines, key=lambda e: e.slot)
    parts = [(e.mapped_bytes, _look(e)[0], _look(e)[1]) for e in ordered]
    bar = Text("[").append_text(split_bar(parts, capacity, max(width - 2, 10))).append("]")
    legend = Text("  ")
    for e in ordered:
        color, glyph = _look(e)
        legend.append(f"{glyph} ", style=color).append(f"{e.name} {fmt_bytes(e.mapped_bytes)}   ")
    legend.append(f"{FREE} free", style="dim")
    return Group(head, bar, legend)


# (column, content width, importance: lower stays longer on narrow terminals)
_COLUMNS = (
    ("NAME", 0, 0),
    ("STATE", 0, 1),
    ("BAR", 20, 2),
    ("MAPPED", 8, 3),
    ("USED", 8, 4),
    ("LIMIT", 8, 5),
    ("SHORT", 8, 6),
    ("ALLOC/s", 7, 7),
    ("DENY/s", 6, 8),
    ("HISTORY", 16, 9),
    ("DEMAND", 8, 10),
    ("PID", 7, 11),
)
_DISPLAY_ORDER = (
    "NAME",
    "PID",
    "STATE",
    "BAR",
    "USED",
    "MAPPED",
    "LIMIT",
    "DEMAND",
    "SHORT",
    "ALLOC/s",
    "DENY/s",
    "HISTORY",
)
_HEADERS = {"BAR": "KV used▕mapped┃limit", "HISTORY": "HISTORY"}
_GAP = 2


def _layout(engines: list[EngineInfo], width: int) -> dict[str, int]:
    """Which columns fit in ``width`` and how wide each is."""
    natural = {name: w for name, w, _ in _COLUMNS}
    natural["NAME"] = min(max(len(e.name) for e in engines) + 2, 26)
    natural["STATE"] = max(max(len(engine_state(e)) for e in engines), 5)
    chosen: dict[str, int] = {}
    used = -_GAP
    for name, _, _ in sorted(_COLUMNS, key=lambda c: c[2]):
        if used + _GAP + natural[name] <= width or name in ("NAME", "STATE"):
            chosen[name] = natural[name]
            used += _GAP + natural[name]
    room = max(width - used, 0)
    grow_bar = min(room, 30 - chosen["BAR"]) if "BAR" in chosen else 0
    chosen["BAR"] = chosen.get("BAR", 0) + grow_bar
    if "HISTORY" in chosen:
        chosen["HISTORY"] += min(room - grow_bar, 40 - chosen["HISTORY"])
    if not chosen["BAR"]:
        del chosen["BAR"]
    return chosen


def _engine_table(engines: list[EngineInfo], history: History, capacities: dict[str, int], width: int) -> Table:
    widths = _layout(engines, width)
    order = [name for name in _DISPLAY_ORDER if name in widths]
    table = Table(box=None, pad_edge=False, expand=False, header_style="bold", padding=(0, _GAP // 2))
    for name in order:
        left = name in ("NAME", "STATE", "BAR", "HISTORY")
        table.add_column(
            _HEADERS.get(name, name),
            justify="left" if left else "right",
            no_wrap=True,
            width=widths[name],
            overflow="ellipsis",
        )
    for e in engines:
        color, glyph = _look(e)
        capacity = capacities.get(e.gpu_uuid, 0) or max(e.mapped_bytes, 1)
        rates = history.rates(e)
        short = max(e.demand_bytes - e.used_bytes, 0)
        state = engine_state(e)
        cells: dict[str, RenderableType] = {
            "NAME": Text(f"{glyph} ", style=color).append(e.name, style="bold"),
            "PID": str(e.pid),
            "STATE": Text(state, style="yellow" if "," in state else ""),
            "USED": fmt_bytes(e.used_bytes),
            "MAPPED": Text(fmt_bytes(e.mapped_bytes), style="bold"),
            "LIMIT": fmt_limit(e.limit_bytes) + ("*" if e.limit_pending else ""),
            "DEMAND": fmt_bytes(e.demand_bytes),
            "SHORT": Text(fmt_bytes(short) if short else "-", style="bold red" if short else "dim"),
            "ALLOC/s": f"{rates.allocs_per_s:.0f}",
            "DENY/s": Text(f"{rates.denied_per_s:.0f}", style="bold red" if rates.denied_per_s else "dim"),
        }
        if "BAR" in widths:
            bar_width = widths["BAR"]
            bar = split_bar(
                [(e.used_bytes, color, "█"), (max(e.mapped_bytes - e.used_bytes, 0), color, "▒")], capacity, bar_width
            )
            if e.limit_bytes is not None and e.limit_bytes < capacity:
                at = min(int(e.limit_bytes * bar_width / capacity), bar_width - 1)
                bar = bar[:at] + Text("┃", style="bold") + bar[at + 1 :]
            cells["BAR"] = bar
        if "HISTORY" in widths:
            cells["HISTORY"] = Text(sparkline(history.mapped_series(e), capacity, widths["HISTORY"]), style=color)
        table.add_row(*(cells[name] for name in order))
    return table


def render_frame(
    snapshot: Snapshot,
    history: History,
    *,
    segment: str,
    width: int,
    sort: str = "mapped",
    reverse: bool = True,
    title: str | None = None,
    footer: str | None = None,
) -> RenderableType:
    """One screen of ``top``."""
    descending = reverse if sort != "name" else not reverse  # names read A to Z by default
    arrow = "↓" if descending else "↑"
    header = Text.assemble(
        (title or "kvctl top", "bold"),
        f"   segment {segment}   {len(snapshot.engines)} engine(s)   sort {sort} {arrow}   ",
        (time.strftime("%H:%M:%S"), "dim"),
    )
    parts: list[RenderableType] = [header, Text()]
    capacities = {g.uuid: g.capacity_bytes for g in snapshot.gpus}
    for gpu in snapshot.gpus:
        parts.append(_gpu_block(gpu, snapshot.engines_on(gpu.uuid), min(width, 140)))
        parts.append(Text())
    if snapshot.engines:
        parts.append(_engine_table(sort_engines(snapshot.engines, history, sort, reverse), history, capacities, width))
    else:
        parts.append(Text("no engines registered", style="dim"))
    if footer:
        parts += [Text(), Text(footer, style="dim")]
    return Group(*parts)
