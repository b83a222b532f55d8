"""Byte sizes: the one parser and formatter used by the library, envs and kvctl."""

from __future__ import annotations

import re

__all__ = ["SizeError", "format_bytes", "parse_size"]


class SizeError(ValueError):
    """A size string could not be parsed."""


_UNITS = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "kb": 1000,
    "kib": 1 << 10,
    "m": 1 << 20,
    "mb": 1000**2,
    "mib": 1 << 20,
    "g": 1 << 30,
    "gb": 1000**3,
    "gib": 1 << 30,
    "t": 1 << 40,
    "tb": 1000**4,
    "tib": 1 << 40,
}

_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*|%)\s*$")

_ALLOWED = "a size like 512MiB, 12G, 4096 (bytes) or, where a total is known, 30%"


def parse_size(text: str, total_bytes: int | None = None) -> int:
    """Parse ``"512MiB"``, ``"12G"``, ``"1.5GiB"``, ``"4096"`` or ``"30%"`` to bytes.

    Single letters (``K``, ``M``, ``G``, ``T``) are binary, as in most GPU tools;
    ``KB``/``MB``/``GB`` are decimal and ``KiB``/``MiB``/``GiB`` binary.

    Args:
        text: the size as typed.
        total_bytes: what a percentage is of; without it a percentage is an error.

    Raises:
        SizeError: unparsable text, an unknown unit, a negative number, or a
            percentage over 100 or without a total.
    """
    match = _SIZE_RE.match(str(text))
    if not match:
        raise SizeError(f"cannot parse size {text!r}: expected {_ALLOWED}")
    number, unit = float(match.group(1)), match.group(2).lower()
    if unit == "%":
        if total_bytes is None:
            raise SizeError(f"size {text!r} is a percentage, but nothing here says what it is a percentage of")
        if number > 100:
            raise SizeError(f"size {text!r} is over 100%")
        return int(total_bytes * number / 100)
    if unit not in _UNITS:
        raise SizeError(f"unknown unit {match.group(2)!r} in {text!r}: expected B, K/KiB/KB, M/MiB/MB, G/GiB/GB or T/TiB/TB")
    return int(number * _UNITS[unit])


def format_bytes(num_bytes: int | float) -> str:
    """Format bytes in binary units with three significant digits (``1.50 GiB``)."""
    value = float(num_bytes)
    sign = "-" if value < 0 else ""
    value = abs(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            if unit == "B":
                return f"{sign}{int(value)} B"
            return f"{sign}{value:.3g} {unit}" if value < 100 else f"{sign}{value:.0f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
