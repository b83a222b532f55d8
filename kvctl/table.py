"""Plain aligned text tables, for the quick commands (``ls``, ``rebalance``).

No rich here: these commands must start fast, and their output goes to pipes as
often as to terminals.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["fmt_bytes", "fmt_limit", "render_table"]


def render_table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[int] = ()) -> str:
    """Columns separated by two spaces; columns whose index is in ``right`` right-aligned."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    lines = []
    for row in [list(headers), *rows]:
        cells = [
            cell.rjust(w) if i in right else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def fmt_bytes(num_bytes: int | None) -> str:
    from kvcached.control import format_bytes

    return "-" if num_bytes is None else format_bytes(num_bytes)


def fmt_limit(limit_bytes: int | None) -> str:
    return "none" if limit_bytes is None else fmt_bytes(limit_bytes)
