"""SGLang with kvcached: activated by the import hook, no engine changes.

:func:`activate` runs when ``sglang`` is imported in a process where ``ENABLE_KVCACHED``
is true. It checks the version — an unsupported one stops the engine, naming the
supported range — and arms the patches of that version range, each applied the moment
SGLang's module finishes importing (see :mod:`kvcached.integrations.sglang.v0_5_23`).
The engine-independent part, the elastic memory behind one SGLang KV pool, is
:mod:`kvcached.integrations.sglang.elastic`.
"""

from __future__ import annotations

from types import ModuleType

from kvcached.integrations.versions import require_supported

__all__ = ["activate"]


def activate(sglang: ModuleType) -> None:
    """Arm the SGLang patches for the imported ``sglang`` package.

    Raises:
        RuntimeError: this SGLang version is outside the supported range.
    """
    require_supported("sglang", "SGLang", getattr(sglang, "__version__", "unknown"))
    from kvcached.integrations.sglang import v0_5_23

    v0_5_23.install()
