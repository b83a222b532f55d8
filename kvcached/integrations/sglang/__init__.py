"""SGLang with kvcached: activated by the import hook, no engine changes.

:func:`activate` runs when ``sglang`` is imported in a process where ``ENABLE_KVCACHED``
is true. It picks the patches of the running version's range — an unsupported version
stops the engine, naming the supported ones — and arms them, each applied the moment
SGLang's module finishes importing (:mod:`.v0_5_17`, :mod:`.v0_5_23`). What both ranges
share: the elastic memory behind one KV pool (:mod:`.elastic`), the pools
(:mod:`.pools`), the allocators (:mod:`.allocators`) and the version-independent patches
(:mod:`.patches`).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from kvcached.integrations.versions import SUPPORTED, VersionRange

__all__ = ["RANGES", "activate", "module_for"]

# The package of patches for each supported range (versions.SUPPORTED["sglang"], in order).
RANGES: tuple[tuple[VersionRange, str], ...] = tuple(zip(SUPPORTED["sglang"].ranges, ("v0_5_17", "v0_5_23"), strict=True))


def _describe() -> str:
    return str(SUPPORTED["sglang"])


def module_for(version: str) -> str | None:
    """The patch package for SGLang ``version`` (e.g. ``"v0_5_17"``), or None if unsupported."""
    return next((name for span, name in RANGES if version in span), None)


def activate(sglang: ModuleType) -> None:
    """Arm the SGLang patches for the imported ``sglang`` package.

    Raises:
        RuntimeError: this SGLang version is not supported (the message names those that are).
    """
    version = str(getattr(sglang, "__version__", "unknown"))
    name = module_for(version)
    if name is None:
        raise RuntimeError(
            f"kvcached supports SGLang {_describe()}, found {version}; "
            "install a supported SGLang or unset ENABLE_KVCACHED to run without kvcached"
        )
    importlib.import_module(f"{__name__}.{name}").install()
