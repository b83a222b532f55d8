"""The reserve: mapped, unused page groups kept ahead of demand, and trimmed when idle.

:class:`ReservePolicy` is the sizing rule, pure and clock-injected so tests drive it:
it watches how fast the allocator draws empty pages (an exponentially weighted rate,
in pages per second) and asks for ``min_pages + ceil(rate * lead_s)`` empty pages,
clamped to ``[min_pages, max_pages]``. Empty pages beyond twice that target (plus one)
are returned; once no allocation has happened for ``trim_idle_s`` the reserve is cut to
``min_pages`` at once.

:class:`ReserveThread` runs a pool's :meth:`~kvcached.pool.keeper.PageKeeper.maintain`
every ``tick_s`` (``idle_tick_s`` when nothing is happening), or sooner when the pool
signals that the reserve ran low. It holds the pool weakly, so a pool nobody
references is collected and its thread ends.
"""

from __future__ import annotations

import logging
import math
import threading
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from kvcached import envs

if TYPE_CHECKING:
    from kvcached.pool.keeper import PageKeeper

__all__ = ["ReserveConfig", "ReservePlan", "ReservePolicy", "ReserveThread"]

_log = logging.getLogger("kvcached.pool")


@dataclass(frozen=True)
class ReserveConfig:
    """How the reserve is sized. Page counts are page groups; times in seconds."""

    min_pages: int = 1
    max_pages: int = 64
    trim_idle_s: float = 0.5
    lead_s: float = 0.25  # how far ahead of the draw rate to map
    half_life_s: float = 0.5  # of the draw-rate average
    tick_s: float = 0.005  # maintenance period while allocations happen
    idle_tick_s: float = 0.05  # maintenance period when idle (bounds limit reaction time)
    map_batch_pages: int = 4  # page groups mapped per driver call, published in between

    def __post_init__(self) -> None:
        if self.min_pages < 0 or self.max_pages < self.min_pages:
            raise ValueError(f"reserve pages must satisfy 0 <= min ({self.min_pages}) <= max ({self.max_pages})")
        for name in ("trim_idle_s", "lead_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("half_life_s", "tick_s", "idle_tick_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.map_batch_pages < 1:
            raise ValueError(f"map_batch_pages must be >= 1, got {self.map_batch_pages}")

    @classmethod
    def from_env(cls) -> ReserveConfig:
        """Read ``KVCACHED_RESERVE_MIN_PAGES``, ``KVCACHED_RESERVE_MAX_PAGES`` and
        ``KVCACHED_TRIM_IDLE_S`` (a max below the min is raised to it)."""
        min_pages = envs.get("KVCACHED_RESERVE_MIN_PAGES")
        max_pages = max(envs.get("KVCACHED_RESERVE_MAX_PAGES"), min_pages)
        return cls(min_pages=min_pages, max_pages=max_pages, trim_idle_s=envs.get("KVCACHED_TRIM_IDLE_S"))


class ReservePlan(NamedTuple):
    target_pages: int  # map until this many empty pages (mapped or being mapped)
    keep_pages: int  # unmap empty pages beyond this many
    idle: bool


class ReservePolicy:
    """Turns the allocator's counters into a reserve size. Not thread-safe (the pool's lock guards it)."""

    def __init__(self, config: ReserveConfig, now: float) -> None:
        self.config = config
        self.rate_pages_per_s = 0.0
        self._last_now = now
        self._last_draws = 0
        self._last_allocs = 0
        self._last_active = now

    def plan(self, now: float, num_reserve_draws: int, num_allocs: int) -> ReservePlan:
        """Update the draw rate with the counters seen at ``now`` and return the plan."""
        cfg = self.config
        elapsed = now - self._last_now
        if elapsed > 0:
            sample = (num_reserve_draws - self._last_draws) / elapsed
            weight = 1.0 - math.exp(-elapsed * math.log(2) / cfg.half_life_s)
            self.rate_pages_per_s += weight * (sample - self.rate_pages_per_s)
            self._last_now = now
            self._last_draws = num_reserve_draws
        if num_allocs != self._last_allocs:
            self._last_allocs = num_allocs
            self._last_active = now
        if now - self._last_active >= cfg.trim_idle_s:
            return ReservePlan(cfg.min_pages, cfg.min_pages, True)
        ahead = math.ceil(self.rate_pages_per_s * cfg.lead_s - 1e-9)
        target = min(cfg.min_pages + ahead, cfg.max_pages)
        return ReservePlan(target, min(2 * target + 1, cfg.max_pages), False)


class ReserveThread:
    """A daemon thread calling ``pool.maintain()`` until stopped or the pool is gone."""

    def __init__(self, pool: PageKeeper, wake: threading.Event, config: ReserveConfig) -> None:
        self._pool_ref = weakref.ref(pool)
        self._wake = wake
        self._stop = threading.Event()
        self._config = config
        self._thread = threading.Thread(target=self._run, name="kvcached-reserve", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Ask the thread to end and wait for it (no-op from the thread itself)."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout_s)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        while not self._stop.is_set():
            pool = self._pool_ref()
            if pool is None:
                return
            self._wake.clear()
            try:
                busy = pool.maintain()
            except Exception as exc:
                _log.error("kvcached reserve thread stopped: %r", exc)
                pool._thread_failed(exc)
                return
            del pool
            self._wake.wait(self._config.tick_s if busy else self._config.idle_tick_s)
