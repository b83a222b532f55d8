"""Every ``KVCACHED_*`` environment variable, declared once, typed, read lazily.

Nothing here reads the environment at import time: each access through
:func:`get` (or the attribute-style ``envs.NAME``) parses the current value, so a
variable set after import is honoured and a bad value raises :class:`EnvError`
naming the variable and what it accepts.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["REGISTRY", "EnvError", "EnvVar", "describe", "get", "is_set"]


class EnvError(ValueError):
    """A ``KVCACHED_*`` (or ``ENABLE_KVCACHED``) variable holds a value we cannot use."""


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _parse_bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError("expected one of 1/0, true/false, yes/no, on/off")


def _parse_size(raw: str) -> int:
    # Imported lazily: units.py is tiny, but keeping envs.py dependency-free
    # lets the import hook load it before anything else.
    from kvcached.units import parse_size

    return parse_size(raw)


def _parse_positive_float(raw: str) -> float:
    value = float(raw)
    if not value > 0:
        raise ValueError("expected a number > 0")
    return value


def _parse_nonneg_float(raw: str) -> float:
    value = float(raw)
    if not value >= 0:
        raise ValueError("expected a number >= 0")
    return value


def _parse_nonneg_int(raw: str) -> int:
    value = int(raw, 0)
    if value < 0:
        raise ValueError("expected an integer >= 0")
    return value


def _parse_choice(*choices: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return value

    return parse


def _parse_str(raw: str) -> str:
    return raw


@dataclass(frozen=True)
class EnvVar:
    """One variable: its name, parser, default and a line of meaning."""

    name: str
    parse: Callable[[str], Any]
    default: Any
    help: str
    accepts: str

    def read(self) -> Any:
        raw = os.environ.get(self.name)
        if raw is None:
            return self.default
        try:
            return self.parse(raw)
        except ValueError as exc:
            raise EnvError(f"{self.name}={raw!r} is invalid: {exc} (accepts {self.accepts})") from None


_VARS: list[EnvVar] = [
    # Activation (the import hook).
    EnvVar("ENABLE_KVCACHED", _parse_bool, False, "turn kvcached on in engines started in this environment", "a boolean"),
    EnvVar("KVCACHED_AUTOPATCH", _parse_bool, True, "with ENABLE_KVCACHED, patch engines when they are imported (0: your code calls the integration)", "a boolean"),
    # The VMM core.
    EnvVar("KVCACHED_BACKEND", _parse_choice("auto", "cuda", "host"), "auto", "VMM backend: cuda, host, or auto (cuda where usable)", "auto, cuda, host"),
    EnvVar("KVCACHED_HOST_CAP", _parse_size, 4 << 30, "physical cap of the host backend (bytes it may create)", "a size such as 512MiB or 4G"),
    EnvVar("KVCACHED_PAGE_SIZE", _parse_size, 2 << 20, "bytes per page in each KV range (multiple of the granularity)", "a size such as 2MiB"),
    EnvVar("KVCACHED_HANDLE_MODE", _parse_choice("auto", "group", "per_range"), "auto", "one physical handle per page group (host only), one per range, or auto", "auto, group, per_range"),
    # The KV pool.
    EnvVar("KVCACHED_TRIM_IDLE_S", _parse_nonneg_float, 0.5, "seconds without allocation after which the reserve is trimmed", "a number >= 0"),
    EnvVar("KVCACHED_RESERVE_MAX_PAGES", _parse_nonneg_int, 64, "most page groups the background reserve keeps mapped ahead", "an integer >= 0"),
    EnvVar("KVCACHED_RESERVE_MIN_PAGES", _parse_nonneg_int, 1, "page groups the reserve keeps mapped even when idle", "an integer >= 0"),
    EnvVar("KVCACHED_IDLE_CACHE_MAX", _parse_size, 256 << 20, "cold prefix cache an engine keeps mapped: cached blocks on pages untouched for 0.1 s (or KVCACHED_TRIM_IDLE_S if shorter) beyond this are evicted, their pages unmapped", "a size such as 256MiB"),
    EnvVar("KVCACHED_MAP_WAIT_S", _parse_nonneg_float, 30.0, "how long a vLLM engine waits for memory the budget or device refused after its capacity check, before it gives up", "a number >= 0"),
    EnvVar("KVCACHED_PACK", _parse_choice("auto", "on", "off"), "auto", "vLLM: hand out free blocks (and cached ones beyond KVCACHED_IDLE_CACHE_MAX) on mapped page groups before mapping another, a request's next to its own; auto: while the GPU has a budget", "auto, on, off"),
    EnvVar("KVCACHED_COMPACT", _parse_choice("auto", "on", "off"), "auto", "vLLM: move running requests' blocks off sparse page groups into free slots of dense ones, so the groups go back (a GPU copy between steps); auto: whenever KVCACHED_PACK packs or a limit is unmet", "auto, on, off"),
    EnvVar("KVCACHED_PREFIX_CACHE_MAX", _parse_size, 0, "SGLang: bytes of freed-but-cached prefix blocks kept (0: KVCACHED_IDLE_CACHE_MAX while the GPU has a budget, else no bound but the limit)", "a size such as 1GiB, or 0"),
    # Engine integrations.
    EnvVar("KVCACHED_VIRTUAL_BYTES", _parse_size, 0, "virtual KV size an engine reports (0: the device's total memory)", "a size such as 80GiB, or 0"),
    EnvVar("KVCACHED_REQUIRE_CONTROL", _parse_bool, True, "fail engine start when it cannot register in the control plane", "a boolean"),
    # The control plane.
    EnvVar("KVCACHED_SHM_NAME", _parse_str, "", "name of the control segment (default: per user)", "a POSIX shm name without slashes"),
    EnvVar("KVCACHED_ENGINE_NAME", _parse_str, "", "the name this engine registers under (default: its served model)", "a short name"),
    EnvVar("KVCACHED_LIMIT", _parse_str, "", "initial KV limit of this engine", "a size (512MiB), a percent (30%) or none"),
    EnvVar("KVCACHED_HEADROOM", _parse_size, 1 << 30, "real free device memory kept for non-KV use before a map is refused", "a size such as 1GiB"),
    EnvVar("KVCACHED_WATCH_INTERVAL_S", _parse_positive_float, 0.02, "how often an engine polls its slot for limit changes", "a number > 0"),
    EnvVar("KVCACHED_LOG_LEVEL", _parse_choice("debug", "info", "warning", "error"), "warning", "level of the kvcached logger", "debug, info, warning, error"),
]

REGISTRY: dict[str, EnvVar] = {var.name: var for var in _VARS}


def get(name: str) -> Any:
    """Return the parsed current value of ``name`` (or its default).

    Raises:
        KeyError: ``name`` is not a declared variable (a programmer error).
        EnvError: the variable is set to a value its parser rejects.
    """
    return REGISTRY[name].read()


def is_set(name: str) -> bool:
    """Whether ``name`` is present in the environment (even if empty)."""
    REGISTRY[name]
    return name in os.environ


def describe() -> list[tuple[str, str, str]]:
    """``(name, default, meaning)`` rows, for ``kvctl doctor`` and the README."""
    return [(v.name, repr(v.default), v.help) for v in _VARS]


def __getattr__(name: str) -> Any:
    if name in REGISTRY:
        return REGISTRY[name].read()
    raise AttributeError(name)
