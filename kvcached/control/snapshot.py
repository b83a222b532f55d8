"""Typed, immutable views of the segment: what ``kvctl`` shows and policies consume."""

from __future__ import annotations

import time
from dataclasses import dataclass

from kvcached.control import registry
from kvcached.control.errors import ControlError, SegmentCorrupt, UnknownEngine, UnknownGpu
from kvcached.control.layout import (
    FLAG_AT_SHARE,
    FLAG_LIMIT_MET,
    FLAG_WATCH_ERROR,
    NO_LIMIT,
    EngineKind,
    EngineState,
    GpuState,
    Slot,
    decode_limit,
)
from kvcached.control.segment import Segment

__all__ = ["EngineInfo", "GpuInfo", "LimitChange", "Snapshot", "read_gpus", "take_snapshot"]

_SNAPSHOT_TRIES = 20


@dataclass(frozen=True)
class GpuInfo:
    """One GPU entry. ``budget_bytes`` None = no budget for kvcached engines."""

    index: int
    uuid: str
    total_bytes: int
    budget_bytes: int | None
    mapped_bytes: int  # the core's sum over this GPU's engines
    headroom_bytes: int
    num_engines: int

    @property
    def capacity_bytes(self) -> int:
        """What kvcached engines may map together: the budget, else total minus headroom."""
        if self.budget_bytes is not None:
            return self.budget_bytes
        return max(self.total_bytes - self.headroom_bytes, 0)


@dataclass(frozen=True)
class EngineInfo:
    """One live engine's slot. ``limit_bytes`` None = unlimited."""

    slot: int
    name: str
    model: str
    kind: EngineKind
    state: EngineState
    pid: int
    gpu_index: int
    gpu_uuid: str
    page_bytes: int
    reserved_bytes: int
    mapped_bytes: int
    used_bytes: int
    cached_bytes: int
    reserve_bytes: int
    demand_bytes: int
    limit_bytes: int | None
    limit_revision: int
    applied_revision: int
    applied_limit_bytes: int | None
    limit_met: bool
    watch_error: bool
    at_share: bool  # held to its fair share while a peer is short of memory
    weight: float
    min_bytes: int
    num_allocs: int
    num_denied: int
    num_maps: int
    num_unmaps: int
    num_sync_maps: int  # maps on the allocation path (the prefetch fell behind)
    heartbeat_age_s: float
    started_ns: int

    @property
    def limit_pending(self) -> bool:
        """A limit was set that the engine has not applied yet."""
        return self.applied_revision < self.limit_revision


@dataclass(frozen=True)
class LimitChange:
    """A limit a rebalance sets (or would set, in a dry run)."""

    name: str
    gpu_uuid: str
    old_limit_bytes: int | None
    new_limit_bytes: int | None


@dataclass(frozen=True)
class Snapshot:
    """Every GPU entry and live engine, read consistently at ``taken_ns`` (monotonic)."""

    gpus: list[GpuInfo]
    engines: list[EngineInfo]
    taken_ns: int
    generation: int

    def engine(self, name: str) -> EngineInfo:
        for info in self.engines:
            if info.name == name:
                return info
        raise UnknownEngine(f"no live engine named {name!r}")

    def gpu(self, key: str | int) -> GpuInfo:
        """The GPU with this UUID (or unique UUID prefix) or entry index."""
        if isinstance(key, int):
            found = [g for g in self.gpus if g.index == key]
        else:
            found = [g for g in self.gpus if g.uuid == key] or [g for g in self.gpus if g.uuid.startswith(key)]
        if len(found) != 1:
            raise UnknownGpu(f"no single GPU entry matches {key!r}")
        return found[0]

    def engines_on(self, gpu_uuid: str) -> list[EngineInfo]:
        return [e for e in self.engines if e.gpu_uuid == gpu_uuid]


def _text(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise SegmentCorrupt(f"{what} is not UTF-8 ({raw[:16]!r}...)") from None


def _gpu_info(seg: Segment, index: int, counts: dict[int, int]) -> GpuInfo:
    gpu = seg.gpus[index]
    return GpuInfo(
        index=index,
        uuid=_text(gpu.uuid, f"GPU entry {index} uuid"),
        total_bytes=gpu.total_bytes,
        budget_bytes=decode_limit(gpu.budget_bytes),
        mapped_bytes=gpu.mapped_bytes,
        headroom_bytes=gpu.headroom_bytes,
        num_engines=counts.get(index, 0),
    )


def _engine_info(index: int, slot: Slot, gpu_uuids: dict[int, str], now_ns: int) -> EngineInfo:
    where = f"slot {index}"
    try:
        kind, state = EngineKind(slot.kind), EngineState(slot.state)
    except ValueError:
        raise SegmentCorrupt(f"{where} holds kind {slot.kind} / state {slot.state}, which no writer makes") from None
    if slot.gpu_index != -1 and slot.gpu_index not in gpu_uuids:
        raise SegmentCorrupt(f"{where} points at GPU entry {slot.gpu_index}, which is not in use")
    applied = slot.applied_limit_bytes
    return EngineInfo(
        slot=index,
        name=_text(slot.name, f"{where} name"),
        model=_text(slot.model, f"{where} model"),
        kind=kind,
        state=state,
        pid=slot.pid,
        gpu_index=slot.gpu_index,
        gpu_uuid=gpu_uuids.get(slot.gpu_index, ""),
        page_bytes=slot.page_bytes,
        reserved_bytes=slot.reserved_bytes,
        mapped_bytes=slot.mapped_bytes,
        used_bytes=slot.used_bytes,
        cached_bytes=slot.cached_bytes,
        reserve_bytes=slot.reserve_bytes,
        demand_bytes=slot.demand_bytes,
        limit_bytes=decode_limit(slot.limit_bytes),
        limit_revision=slot.limit_revision,
        applied_revision=slot.applied_revision,
        applied_limit_bytes=None if applied == NO_LIMIT else applied,
        limit_met=bool(slot.flags & FLAG_LIMIT_MET),
        watch_error=bool(slot.flags & FLAG_WATCH_ERROR),
        at_share=bool(slot.flags & FLAG_AT_SHARE),
        weight=slot.weight,
        min_bytes=slot.min_bytes,
        num_allocs=slot.num_allocs,
        num_denied=slot.num_denied,
        num_maps=slot.num_maps,
        num_unmaps=slot.num_unmaps,
        num_sync_maps=slot.num_sync_maps,
        heartbeat_age_s=max(now_ns - slot.heartbeat_ns, 0) / 1e9,
        started_ns=slot.started_ns,
    )


def read_gpus(seg: Segment) -> dict[int, GpuInfo]:
    """The GPU entries in use, by index (``num_engines`` is not filled in: 0)."""
    return {i: _gpu_info(seg, i, {}) for i, gpu in enumerate(seg.gpus) if gpu.state == GpuState.IN_USE}


def take_snapshot(seg: Segment, reclaim: bool = True) -> Snapshot:
    """Read every GPU entry and live engine; with ``reclaim``, free dead engines' slots first.

    Retries while the tables change underneath (the header's generation moved).

    Raises:
        SegmentCorrupt: an entry holds values no writer makes.
    """
    if reclaim:
        registry.reclaim_dead(seg)
    for _ in range(_SNAPSHOT_TRIES):
        generation = seg.header.generation
        gpu_uuids = {
            i: _text(gpu.uuid, f"GPU entry {i} uuid") for i, gpu in enumerate(seg.gpus) if gpu.state == GpuState.IN_USE
        }
        now_ns = time.monotonic_ns()
        engines = []
        for i, view in enumerate(seg.slots):
            if view.state == EngineState.FREE and not view.seq & 1:
                continue  # a claim makes seq odd first, and the generation check catches the rest
            slot = registry.read_slot(seg, i)
            if slot.state == EngineState.FREE:
                continue
            engines.append(_engine_info(i, slot, gpu_uuids, now_ns))
        counts: dict[int, int] = {}
        for info in engines:
            counts[info.gpu_index] = counts.get(info.gpu_index, 0) + 1
        gpus = [_gpu_info(seg, i, counts) for i in gpu_uuids]
        if seg.header.generation == generation:
            return Snapshot(gpus=gpus, engines=engines, taken_ns=now_ns, generation=generation)
    raise ControlError(f"control segment {seg.name!r} kept changing during {_SNAPSHOT_TRIES} snapshot attempts")
