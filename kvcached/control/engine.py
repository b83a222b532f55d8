"""The engine side: register a KV pool in the segment and keep its slot current.

``attach_engine`` claims a slot, points the pool's arena at the slot's and the GPU's
counters (so every map and unmap is admitted against the GPU budget and counted by the
core), and starts a watcher thread. Every ``KVCACHED_WATCH_INTERVAL_S`` (20 ms) the watcher
applies a new limit revision through ``pool.set_limit_bytes`` — so an idle engine follows a
limit change within one interval — publishes the revision it applied, the pool's stats and
a heartbeat.

Memory moves between engines without a daemon: when an engine is refused memory while
under its own limit (the GPU budget or the device is full), its watcher stamps the GPU's
``pressure_ns``; every other watcher on that GPU then hands its idle reserve pages and
its cache-only pages back (``pool.trim_reserve()``) instead of waiting for its idle-trim
timer.

The library installs no signal handlers and prints nothing; a dead engine's slot is
reclaimed by whoever looks next.
"""

from __future__ import annotations

import atexit
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol

from kvcached.control import registry
from kvcached.control.errors import InvalidValue
from kvcached.control.layout import (
    FLAG_AT_SHARE,
    FLAG_LIMIT_MET,
    FLAG_WATCH_ERROR,
    NO_LIMIT,
    EngineKind,
    EngineState,
    decode_limit,
    encode_limit,
)
from kvcached.control.segment import Segment

__all__ = ["FROM_ENV", "EngineHandle", "attach_engine"]


class _FromEnv:
    def __repr__(self) -> str:
        return "FROM_ENV"


FROM_ENV: Any = _FromEnv()  # "read this setting from its KVCACHED_* variable"

_CONTENTION_HOLD_S = 1.0  # a peer's refusal keeps this engine to its fair share this long
_PRESSURE_TTL_NS = 1_000_000_000  # older pressure is stale: the refused engine gave up or got memory
_live: set[EngineHandle] = set()
_atexit_registered = False
_live_lock = threading.Lock()


class _Backend(Protocol):
    uuid: str

    def mem_info(self) -> tuple[int, int]: ...


def attach_engine(
    pool: Any,
    name: str,
    model: str,
    kind: EngineKind | str = EngineKind.OTHER,
    shm_name: str | None = None,
    *,
    arena: Any = None,
    backend: _Backend | None = None,
    limit_bytes: int | None = FROM_ENV,
    weight: float = 1.0,
    min_bytes: int = 0,
    headroom_bytes: int = FROM_ENV,
) -> EngineHandle:
    """Register ``pool`` as engine ``name`` and start following the control plane.

    Args:
        pool: a ``kvcached.pool.KVPool`` or ``PagePool`` (``stats()``, ``set_limit_bytes``,
            ``limit_met``, ``trim_reserve()``, called from the watcher thread).
        name: unique among live engines on this host (see ``registry.check_name``).
        model: what it serves, for display.
        kind: ``EngineKind`` or its name ("vllm", "sglang", "other").
        shm_name: the segment; default ``KVCACHED_SHM_NAME`` or ``kvcached-<uid>``.
        arena: the ``kvcached._vmm.Arena`` that maps the pool's pages; default ``pool.arena``.
        backend: the VMM backend whose ``uuid`` and ``mem_info()`` identify the GPU;
            default ``pool.backend``.
        limit_bytes: initial limit (None = unlimited); default ``KVCACHED_LIMIT``.
        weight, min_bytes: inputs to rebalance policies.
        headroom_bytes: real free memory a map must leave on the device; used when this
            engine creates the GPU's entry (default ``KVCACHED_HEADROOM``). Engines on a GPU
            share the entry's value.

    Returns:
        An ``EngineHandle``; ``close()`` it (or let ``atexit`` do so) before closing the pool.

    Raises:
        DuplicateName, SlotTableFull, GpuTableFull, InvalidValue, and the segment's errors.
    """
    from kvcached import envs

    kind = _engine_kind(kind)
    registry.check_name(name)
    if not (isinstance(weight, (int, float)) and weight > 0 and weight != float("inf")):
        raise InvalidValue(f"weight must be a finite number > 0, got {weight!r}")
    _check_bytes("min_bytes", min_bytes)
    arena = arena if arena is not None else getattr(pool, "arena", None)
    backend = backend if backend is not None else getattr(pool, "backend", None)
    if arena is None or backend is None:
        raise TypeError("attach_engine needs the pool's arena and backend: pass arena= and backend=")
    total_bytes = int(backend.mem_info()[1])
    if headroom_bytes is FROM_ENV:
        headroom_bytes = int(envs.get("KVCACHED_HEADROOM"))
    _check_bytes("headroom_bytes", headroom_bytes)
    if limit_bytes is not None and limit_bytes is not FROM_ENV:
        _check_bytes("limit_bytes", limit_bytes)

    seg = Segment.open(shm_name, create=True)
    try:
        uuid = str(backend.uuid)
        if limit_bytes is FROM_ENV:
            limit_bytes = _limit_from_env(seg, uuid, total_bytes, headroom_bytes)
        gpu_index = registry.find_or_create_gpu(seg, uuid, total_bytes, headroom_bytes)
        slot_index, claim_id = registry.claim_slot(
            seg, name, model, kind, gpu_index, limit_bytes, float(weight), min_bytes
        )
    except BaseException:
        seg.close()
        raise
    handle = EngineHandle(seg, slot_index, claim_id, pool, arena, name)
    try:
        handle._start()
    except BaseException:
        handle.close()
        raise
    return handle


class EngineHandle:
    """An engine's registration. ``close()`` stops the watcher, detaches the arena's ledger
    and frees the slot; after it, the pool's memory no longer counts against the budget.

    Thread safety: ``close`` and ``set_sleeping`` may be called from any thread.
    """

    def __init__(self, seg: Segment, slot_index: int, claim_id: int, pool: Any, arena: Any, name: str) -> None:
        self.segment = seg
        self.slot_index = slot_index
        self.name = name
        self.pool = pool
        self.arena = arena
        self.error: BaseException | None = None  # the watcher's last failure, if any
        self._claim_id = claim_id
        self._slot = seg.slots[slot_index]
        self._pid = os.getpid()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ledger_set = False
        self._closed = False
        self._close_lock = threading.Lock()
        self._write_lock = threading.Lock()  # the watcher and set_sleeping both write the slot
        self._attempted_revision = 0
        self._flags = 0
        self._gpu = seg.gpus[self._slot.gpu_index]
        self._num_denied = 0
        self._pressure_seen_ns = 0
        self._peer_denied: dict[int, int] = {}
        self._contended_until = 0.0
        self._share_set: int | None = None

    # -- lifecycle -------------------------------------------------------------------

    def _start(self) -> None:
        from kvcached import envs

        interval_s = float(envs.get("KVCACHED_WATCH_INTERVAL_S"))
        seg, slot, arena = self.segment, self._slot, self.arena
        gpu = seg.gpus[slot.gpu_index]
        with self._writing():
            slot.state = EngineState.STARTING
            slot.page_bytes = int(arena.page_bytes)
            slot.reserved_bytes = int(arena.num_ranges) * int(arena.range_bytes)
        _register(self)
        arena.set_ledger(
            seg.address_of(slot, "mapped_bytes"),
            seg.address_of(gpu, "mapped_bytes"),
            seg.address_of(gpu, "budget_bytes"),
            int(gpu.headroom_bytes),
        )
        self._ledger_set = True
        self._tick()
        with self._writing():
            slot.state = EngineState.RUNNING
        with seg.lock():
            seg.bump_generation()
        self._thread = threading.Thread(
            target=self._watch, args=(interval_s,), name=f"kvcached-watch-{self.name}", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        """Stop the watcher, clear the ledger, free the slot, unmap the segment. Idempotent.

        In a forked child of the engine this does nothing (the slot is the parent's).
        """
        with self._close_lock:
            if self._closed or os.getpid() != self._pid:
                return
            self._closed = True
            self._stop.set()
            if self._thread is not None and self._thread is not threading.current_thread():
                self._thread.join()
            if self._ledger_set:
                self.arena.clear_ledger()
                self._ledger_set = False
            if self._owns_slot():
                with self._writing():
                    self._slot.state = EngineState.EXITING
                registry.release_slot(self.segment, self.slot_index, self._claim_id)
            del self._slot
            self.segment.close()
            _unregister(self)

    def __enter__(self) -> EngineHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def set_sleeping(self, sleeping: bool) -> None:
        """Publish that the engine sleeps (policies then give it only its min) or woke."""
        if self._closed:
            raise InvalidValue(f"engine {self.name!r} is closed")
        with self._writing():
            self._slot.state = EngineState.SLEEPING if sleeping else EngineState.RUNNING
        with self.segment.lock():
            self.segment.bump_generation()

    def budget_room_bytes(self) -> int | None:
        """Bytes the GPU's budget still admits (None: no budget, or closed).

        A hint for capacity estimates: another engine may map them first, so a map can
        still be refused.
        """
        if self._closed:
            return None
        gpu = self._gpu
        budget = int(gpu.budget_bytes)
        if budget == NO_LIMIT:
            return None
        return max(0, budget - int(gpu.mapped_bytes))

    @contextmanager
    def _writing(self) -> Iterator[None]:
        with self._write_lock, registry.engine_write(self._slot):
            yield

    # -- the watcher -----------------------------------------------------------------

    def _owns_slot(self) -> bool:
        return bool(self._slot.claim_id == self._claim_id)

    def _watch(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            if not self._owns_slot():
                # Someone judged us dead and took the slot: we must stop counting into it.
                self.error = RuntimeError(f"slot {self.slot_index} of engine {self.name!r} was reclaimed")
                self.arena.clear_ledger()
                self._ledger_set = False
                return
            try:
                self._tick()
            except Exception as exc:  # recorded for kvctl; the watcher keeps the heartbeat going
                self.error = exc
                self._flags |= FLAG_WATCH_ERROR
                with self._writing():
                    self._slot.flags |= FLAG_WATCH_ERROR
                    self._slot.heartbeat_ns = time.monotonic_ns()

    def _tick(self) -> None:
        """Apply a new limit revision if there is one, then publish stats and a heartbeat."""
        slot = self._slot
        control = registry.read_control(slot)
        applied: tuple[int, int | None] | None = None
        if control is not None and control[1] != self._attempted_revision:
            limit_word, revision = control
            self._attempted_revision = revision
            try:
                self.pool.set_limit_bytes(decode_limit(limit_word))
            except Exception as exc:  # recorded for kvctl; a bad limit must not kill the engine
                self.error = exc
                self._flags |= FLAG_WATCH_ERROR
            else:
                applied = (revision, decode_limit(limit_word))
                self._flags &= ~FLAG_WATCH_ERROR
        stats = self.pool.stats()
        self._follow_pressure(stats)
        self._follow_share()
        flags = (self._flags & ~(FLAG_LIMIT_MET | FLAG_AT_SHARE)) | (FLAG_LIMIT_MET if self.pool.limit_met else 0)
        flags |= FLAG_AT_SHARE if self._share_set is not None else 0
        with self._writing():
            slot.used_bytes = stats.used_bytes
            slot.cached_bytes = stats.cached_bytes
            slot.reserve_bytes = stats.reserve_bytes
            slot.demand_bytes = stats.used_bytes + stats.demand_bytes  # the pool's is the shortfall
            slot.num_allocs = stats.num_allocs
            slot.num_denied = stats.num_denied
            slot.num_maps = stats.num_pages_mapped_total
            slot.num_unmaps = stats.num_pages_unmapped_total
            slot.num_sync_maps = stats.num_sync_maps
            slot.flags = flags
            slot.heartbeat_ns = time.monotonic_ns()
            if applied is not None:
                slot.applied_limit_bytes = encode_limit(applied[1])
                slot.applied_revision = applied[0]

    def _follow_pressure(self, stats: Any) -> None:
        gpu, now_ns = self._gpu, time.monotonic_ns()
        refused = (
            stats.num_denied > self._num_denied and self.pool.limit_met and stats.mapped_bytes < stats.virtual_bytes
        )
        self._num_denied = stats.num_denied
        if refused:
            gpu.pressure_ns = now_ns  # one aligned store; the latest writer wins, which is all we need
            self._pressure_seen_ns = now_ns
            return
        pressure_ns = int(gpu.pressure_ns)
        if pressure_ns > self._pressure_seen_ns:
            self._pressure_seen_ns = pressure_ns
            if (stats.reserve_bytes or stats.cached_bytes) and now_ns - pressure_ns < _PRESSURE_TTL_NS:
                self.pool.trim_reserve()

    def _follow_share(self) -> None:
        """Tell the pool its fair share of the budget (by weight, among awake engines on
        this GPU) while another of them was refused memory in the last second; else None."""
        set_share = getattr(self.pool, "set_share_bytes", None)
        budget = int(self._gpu.budget_bytes)
        if set_share is None or budget == NO_LIMIT:
            share = None
        else:
            my_gpu, total_weight, my_weight, contended = self._slot.gpu_index, 0.0, 1.0, False
            for index, slot in enumerate(self.segment.slots):
                if slot.gpu_index != my_gpu or slot.state != EngineState.RUNNING:
                    continue
                weight = float(slot.weight) if slot.weight > 0 else 1.0
                total_weight += weight
                if index == self.slot_index:
                    my_weight = weight
                    continue
                denied = int(slot.num_denied)
                contended |= denied > self._peer_denied.get(index, denied)
                self._peer_denied[index] = denied
            now = time.monotonic()
            if contended:
                self._contended_until = now + _CONTENTION_HOLD_S
            share = int(budget * my_weight / total_weight) if now < self._contended_until and total_weight else None
        if share != self._share_set:
            self._share_set = share
            if set_share is not None:
                set_share(share)

    def __repr__(self) -> str:
        return f"EngineHandle({self.name!r}, slot={self.slot_index}, closed={self._closed})"


def _limit_from_env(seg: Segment, uuid: str, total_bytes: int, headroom_bytes: int) -> int | None:
    """``KVCACHED_LIMIT``; a percentage is of the GPU's capacity, as in ``Controller.set_limit``."""
    from kvcached import envs
    from kvcached.control.snapshot import read_gpus
    from kvcached.units import SizeError, parse_size

    raw = str(envs.get("KVCACHED_LIMIT")).strip()
    if raw.lower() in ("", "none", "unlimited"):
        return None
    index = registry.find_gpu(seg, uuid)
    capacity = read_gpus(seg)[index].capacity_bytes if index is not None else max(total_bytes - headroom_bytes, 0)
    try:
        return parse_size(raw, capacity)
    except SizeError as exc:
        raise InvalidValue(f"KVCACHED_LIMIT={raw!r} is invalid: {exc}") from None


def _engine_kind(kind: EngineKind | str) -> EngineKind:
    if isinstance(kind, EngineKind):
        return kind
    try:
        return EngineKind[str(kind).upper()]
    except KeyError:
        choices = ", ".join(k.name.lower() for k in EngineKind)
        raise InvalidValue(f"unknown engine kind {kind!r}: expected one of {choices}") from None


def _check_bytes(what: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < (1 << 63):
        raise InvalidValue(f"{what} must be an integer number of bytes >= 0, got {value!r}")


def _register(handle: EngineHandle) -> None:
    # Strong references: an arena writes to the segment's memory, so the handle (and the
    # mapping it holds) must outlive it even if the caller drops the handle.
    global _atexit_registered
    with _live_lock:
        _live.add(handle)
        if not _atexit_registered:
            atexit.register(_close_all)
            _atexit_registered = True


def _unregister(handle: EngineHandle) -> None:
    with _live_lock:
        _live.discard(handle)


def _close_all() -> None:
    with _live_lock:
        handles = list(_live)
    for handle in handles:
        handle.close()
