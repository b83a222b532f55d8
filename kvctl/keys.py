"""Single keys from a terminal, without echo or Enter, for the live views' shortcuts.

On a TTY the terminal goes into cbreak mode (keys arrive one by one, Ctrl-C still raises
KeyboardInterrupt) and is restored on exit whatever happens. Elsewhere no key ever comes.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import termios
import time
import tty
from collections.abc import Iterator
from typing import Any

__all__ = ["KeyReader", "stop_on_term"]


class KeyReader:
    """Context manager; :meth:`read` waits up to ``timeout_s`` for a key."""

    def __init__(self, stream: Any = None) -> None:
        self._stream = stream if stream is not None else sys.stdin
        self._fd: int | None = None
        self._saved: list[Any] | None = None

    def __enter__(self) -> KeyReader:
        try:
            fd = self._stream.fileno()
        except (AttributeError, OSError, ValueError):
            return self
        if os.isatty(fd):
            self._fd = fd
            self._saved = termios.tcgetattr(fd)
            tty.setcbreak(fd)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None and self._saved is not None:
            termios.tcsetattr(self._fd, termios.TCSADRAIN, self._saved)
        self._fd = self._saved = None

    @property
    def interactive(self) -> bool:
        return self._fd is not None

    def read(self, timeout_s: float) -> str | None:
        """The next key, or None after ``timeout_s`` (at once-and-sleep when not a TTY)."""
        if self._fd is None:
            time.sleep(max(timeout_s, 0.0))
            return None
        ready, _, _ = select.select([self._fd], [], [], max(timeout_s, 0.0))
        if not ready:
            return None
        data = os.read(self._fd, 32)
        return data.decode(errors="ignore")[:1] or None


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def stop_on_term() -> Iterator[None]:
    """Make SIGTERM and SIGHUP end the enclosed block like Ctrl-C, so that the same clean
    exit runs (terminal restored, demo engines stopped, segment removed); their default
    action would kill kvctl on the spot."""
    saved = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
