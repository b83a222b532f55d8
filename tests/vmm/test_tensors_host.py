"""Zero-copy torch views over host-backend arenas."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from kvcached import vmm  # noqa: E402

MiB = 1 << 20
PAGE = 2 * MiB


@pytest.fixture
def arena():
    backend = vmm.make_backend("host", host_cap_bytes=64 * MiB)
    arena = vmm.Arena(backend, 2, 8 * PAGE, PAGE)
    yield backend, arena
    arena.close()


def test_tensor_aliases_the_range_and_survives_other_pages_remapping(arena):
    backend, arena = arena
    arena.map([0, 1, 2, 3])
    elems_per_page = PAGE // 2
    k = vmm.tensor_from_range(backend, arena.range_addr(0), (4, elems_per_page), torch.bfloat16, owner=arena)
    v = vmm.tensor_from_range(backend, arena.range_addr(1), (4, elems_per_page), torch.bfloat16, owner=arena)
    assert k.data_ptr() == arena.range_addr(0) and v.data_ptr() == arena.range_addr(1)
    expected = torch.randn(4, elems_per_page).to(torch.bfloat16)
    k.copy_(expected)
    v.copy_(-expected)
    for _ in range(3):
        arena.unmap([1, 3])
        arena.map([3, 1])
        k[1].fill_(7)
        k[3].fill_(7)
    assert torch.equal(k[0], expected[0]) and torch.equal(k[2], expected[2])
    assert torch.equal(v[0], -expected[0]) and torch.equal(v[2], -expected[2])
    assert k.data_ptr() == arena.range_addr(0)


def test_strided_view_over_two_ranges(arena):
    backend, arena = arena
    arena.map([0])
    range_elems = arena.range_bytes // 4
    kv = vmm.tensor_from_range(backend, arena.base_addr, (2, 16), torch.float32, strides=(range_elems, 1))
    kv[0].fill_(1.0)
    kv[1].fill_(2.0)
    k_alone = vmm.tensor_from_range(backend, arena.range_addr(0), (16,), torch.float32)
    v_alone = vmm.tensor_from_range(backend, arena.range_addr(1), (16,), torch.float32)
    assert k_alone.sum().item() == 16.0 and v_alone.sum().item() == 32.0


def test_bad_shape_is_a_value_error(arena):
    backend, arena = arena
    with pytest.raises(ValueError, match="shape and strides"):
        vmm.tensor_from_range(backend, arena.base_addr, (-1, 4), torch.float16)


def test_make_backend_rejects_unknown_kind():
    with pytest.raises(ValueError, match="'auto', 'cuda' or 'host'"):
        vmm.make_backend("tpu")


def test_make_backend_auto_falls_back_to_host_without_a_gpu(monkeypatch):
    monkeypatch.setenv("KVCACHED_BACKEND", "auto")
    backend = vmm.make_backend(host_cap_bytes=8 * MiB)
    expected = "cuda" if vmm.backend_status()["cuda"] == "ok" else "host"
    assert backend.name == expected
