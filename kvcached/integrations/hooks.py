"""Run a callback right after a module is imported, whoever imports it.

The engines are patched this way: nothing in vLLM or SGLang changes, and a patch
applies in every process that imports the patched module (API server, engine core,
workers), at the moment the module finishes executing — before any other code can
take references to the names we replace.

Thread safety: registration and dispatch hold one lock; callbacks run once per
module per process, in registration order.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import threading
from collections.abc import Callable, Sequence
from types import ModuleType

__all__ = ["when_imported"]

_lock = threading.RLock()
_callbacks: dict[str, list[Callable[[ModuleType], None]]] = {}
_finder: _PostImportFinder | None = None


class _PostImportLoader(importlib.abc.Loader):
    def __init__(self, wrapped: importlib.abc.Loader) -> None:
        self.wrapped = wrapped

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.wrapped.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.wrapped.exec_module(module)
        _run_callbacks(module)

    def __getattr__(self, name: str) -> object:
        # get_source, get_code, is_package, ... for tools that ask the loader.
        return getattr(self.wrapped, name)


class _PostImportFinder(importlib.abc.MetaPathFinder):
    def __init__(self) -> None:
        self._busy = threading.local()

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in _callbacks or getattr(self._busy, "name", None) == fullname:
            return None
        self._busy.name = fullname
        try:
            # Ask the rest of sys.meta_path for the real spec, then wrap its loader.
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
            else:
                return None
        finally:
            self._busy.name = None
        if spec.loader is None:
            return spec
        spec.loader = _PostImportLoader(spec.loader)
        return spec


def _run_callbacks(module: ModuleType) -> None:
    with _lock:
        callbacks = _callbacks.pop(module.__name__, [])
    for callback in callbacks:
        callback(module)


def when_imported(module_name: str, callback: Callable[[ModuleType], None]) -> None:
    """Call ``callback(module)`` once ``module_name`` has been imported.

    If the module is imported already, the callback runs now. Exceptions from the
    callback propagate to the importer (a patch that cannot apply must stop the
    engine, never leave it half-patched).
    """
    global _finder
    with _lock:
        module = sys.modules.get(module_name)
        if module is None:
            _callbacks.setdefault(module_name, []).append(callback)
            if _finder is None:
                _finder = _PostImportFinder()
                sys.meta_path.insert(0, _finder)
            return
    callback(module)
