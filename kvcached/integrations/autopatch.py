"""Arm the engine patches in this process (called by the ``.pth`` line when
``ENABLE_KVCACHED`` is true, or by hand).

Nothing is patched here: each engine's patches run when the engine's own modules
are imported (see :mod:`kvcached.integrations.hooks`). The decision is taken once,
at interpreter start, so setting the variables after an engine was imported cannot
half-apply them.
"""

from __future__ import annotations

import sys
import threading
from types import ModuleType

from kvcached import envs
from kvcached.integrations.hooks import when_imported

__all__ = ["install", "installed"]

_lock = threading.Lock()
_installed = False


def installed() -> bool:
    """Whether :func:`install` armed the patches in this process."""
    return _installed


def install() -> bool:
    """Arm the vLLM and SGLang patches, once. Returns whether they are armed.

    Does nothing (returns False) unless ``ENABLE_KVCACHED`` is true and
    ``KVCACHED_AUTOPATCH`` is not false. An engine already imported before this
    call makes it raise, because its modules may hold references to the
    unpatched names.

    Raises:
        RuntimeError: an engine was imported before kvcached could patch it.
        EnvError: a ``KVCACHED_*`` variable has a bad value.
    """
    global _installed
    with _lock:
        if _installed:
            return True
        if not envs.get("ENABLE_KVCACHED") or not envs.get("KVCACHED_AUTOPATCH"):
            return False
        early = [name for name in ("vllm", "sglang") if name in sys.modules]
        if early:
            raise RuntimeError(
                f"kvcached: {', '.join(early)} was imported before kvcached could patch it; "
                "set ENABLE_KVCACHED before the engine starts (or use `kvctl launch -- ...`)"
            )
        when_imported("vllm", _patch_vllm)
        when_imported("sglang", _patch_sglang)
        _installed = True
        return True


def _patch_vllm(module: ModuleType) -> None:
    from kvcached.integrations.vllm import activate

    activate(module)


def _patch_sglang(module: ModuleType) -> None:
    from kvcached.integrations.sglang import activate

    activate(module)
