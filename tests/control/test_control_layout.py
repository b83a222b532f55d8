"""The segment layout: sizes, alignment, and a round trip through a real segment."""

from __future__ import annotations

import ctypes

import pytest

from kvcached.control import Controller, EngineKind, EngineState, layout, registry
from kvcached.control.layout import NO_LIMIT, GpuEntry, Header, Slot


@pytest.mark.parametrize("struct", [Header, GpuEntry, Slot])
def test_every_counter_is_8_byte_aligned(struct: type[ctypes.Structure]) -> None:
    for name, ctype, *_ in struct._fields_:
        offset = getattr(struct, name).offset
        if ctypes.sizeof(ctype) == 8:
            assert offset % 8 == 0, f"{struct.__name__}.{name} at {offset}"


def test_record_sizes_are_the_declared_ones() -> None:
    assert ctypes.sizeof(Header) == layout.HEADER_BYTES
    assert ctypes.sizeof(GpuEntry) == layout.GPU_ENTRY_BYTES
    assert ctypes.sizeof(Slot) == layout.SLOT_BYTES
    assert layout.segment_bytes(2, 3) == 256 + 2 * 256 + 3 * 1024


def test_seqlocks_lead_the_slot() -> None:
    # claim_slot() clears everything after the first 16 bytes and must keep both seqlocks.
    assert Slot.seq.offset == 0 and Slot.ctl_seq.offset == 8  # type: ignore[attr-defined]


def test_limit_encoding_round_trips() -> None:
    assert layout.encode_limit(None) == NO_LIMIT
    assert layout.decode_limit(NO_LIMIT) is None
    assert layout.decode_limit(layout.encode_limit(12345)) == 12345


def test_header_checksum_covers_the_static_fields() -> None:
    hdr = Header(abi_version=1, num_gpus=2, num_slots=3)
    before = layout.header_checksum(bytes(hdr))
    hdr.num_slots = 4
    assert layout.header_checksum(bytes(hdr)) != before
    hdr.generation += 1  # changes at run time: outside the checksum
    after = layout.header_checksum(bytes(hdr))
    hdr.generation += 1
    assert layout.header_checksum(bytes(hdr)) == after


def test_round_trip_through_a_segment(controller: Controller) -> None:
    seg = controller.segment
    gpu = registry.find_or_create_gpu(seg, "GPU-1234", total_bytes=80 << 30, headroom_bytes=1 << 30)
    index, _ = registry.claim_slot(seg, "llama-a", "meta/llama", EngineKind.VLLM, gpu, 8 << 30, 2.5, 1 << 30)
    slot = seg.slots[index]
    with registry.engine_write(slot):
        slot.state = EngineState.RUNNING
        slot.page_bytes, slot.reserved_bytes = 2 << 20, 64 << 30
        slot.used_bytes, slot.cached_bytes, slot.reserve_bytes, slot.demand_bytes = 1, 2, 3, 4
        slot.num_allocs, slot.num_denied, slot.num_maps, slot.num_unmaps, slot.num_sync_maps = 5, 6, 7, 8, 9
        slot.flags = layout.FLAG_LIMIT_MET
        slot.applied_revision, slot.applied_limit_bytes = 1, 8 << 30
    seg.gpus[gpu].mapped_bytes = slot.mapped_bytes = 6 << 20
    controller.set_budget("GPU-1234", 40 << 30)

    with Controller.open(seg.name) as other:  # a second mapping of the same segment
        snap = other.snapshot()
    (g,) = snap.gpus
    assert (g.uuid, g.total_bytes, g.budget_bytes, g.mapped_bytes, g.headroom_bytes, g.num_engines) == (
        "GPU-1234",
        80 << 30,
        40 << 30,
        6 << 20,
        1 << 30,
        1,
    )
    e = snap.engine("llama-a")
    assert (e.model, e.kind, e.state, e.gpu_uuid, e.page_bytes, e.reserved_bytes) == (
        "meta/llama",
        EngineKind.VLLM,
        EngineState.RUNNING,
        "GPU-1234",
        2 << 20,
        64 << 30,
    )
    assert (e.used_bytes, e.cached_bytes, e.reserve_bytes, e.demand_bytes, e.mapped_bytes) == (1, 2, 3, 4, 6 << 20)
    assert (e.num_allocs, e.num_denied, e.num_maps, e.num_unmaps, e.num_sync_maps) == (5, 6, 7, 8, 9)
    assert (e.limit_bytes, e.limit_revision, e.applied_revision, e.applied_limit_bytes) == (8 << 30, 1, 1, 8 << 30)
    assert (e.weight, e.min_bytes, e.limit_met, e.watch_error, e.limit_pending) == (2.5, 1 << 30, True, False, False)
    assert e.heartbeat_age_s < 5


def test_model_names_are_cut_on_a_character_boundary(controller: Controller) -> None:
    seg = controller.segment
    gpu = registry.find_or_create_gpu(seg, "GPU-x", 1 << 30, 0)
    index, _ = registry.claim_slot(seg, "m", "é" * 400, EngineKind.OTHER, gpu, None, 1.0, 0)
    model = controller.snapshot().engine("m").model
    assert model == "é" * len(model) and len(model.encode()) <= layout.MODEL_BYTES - 1
    assert index == 0
