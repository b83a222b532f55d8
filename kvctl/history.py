"""Short histories and rates from successive snapshots: what ``top`` draws besides the snapshot.

Pure bookkeeping, no rich: ``top`` and ``demo`` feed it snapshots, the views read it.
An engine is known by its name and pid, so a restarted engine starts a fresh history.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from kvcached.control import EngineInfo, Snapshot

__all__ = ["History", "Rates"]


class Rates(NamedTuple):
    allocs_per_s: float
    denied_per_s: float


@dataclass
class _Track:
    mapped_bytes: deque[int]
    num_allocs: int
    num_denied: int
    taken_ns: int
    rates: Rates = field(default_factory=lambda: Rates(0.0, 0.0))


class History:
    """The last ``length`` samples of every engine's mapped bytes, and its alloc/denial rates."""

    def __init__(self, length: int = 30) -> None:
        self.length = length
        self._engines: dict[tuple[str, int], _Track] = {}

    def update(self, snapshot: Snapshot) -> None:
        """Add one snapshot; engines that are gone are forgotten."""
        seen = set()
        for e in snapshot.engines:
            key = (e.name, e.pid)
            seen.add(key)
            track = self._engines.get(key)
            if track is None:
                self._engines[key] = _Track(
                    deque([e.mapped_bytes], self.length),
                    e.num_allocs,
                    e.num_denied,
                    snapshot.taken_ns,
                )
                continue
            dt_s = (snapshot.taken_ns - track.taken_ns) / 1e9
            if dt_s > 0:
                track.rates = Rates(
                    max(e.num_allocs - track.num_allocs, 0) / dt_s,
                    max(e.num_denied - track.num_denied, 0) / dt_s,
                )
                track.num_allocs, track.num_denied, track.taken_ns = e.num_allocs, e.num_denied, snapshot.taken_ns
            track.mapped_bytes.append(e.mapped_bytes)
        for key in set(self._engines) - seen:
            del self._engines[key]

    def mapped_series(self, engine: EngineInfo) -> list[int]:
        track = self._engines.get((engine.name, engine.pid))
        return list(track.mapped_bytes) if track else [engine.mapped_bytes]

    def rates(self, engine: EngineInfo) -> Rates:
        track = self._engines.get((engine.name, engine.pid))
        return track.rates if track else Rates(0.0, 0.0)
