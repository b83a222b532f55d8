"""GPU scenarios for the VMM core, each run in its own spawned process by test_vmm_cuda.py.

Every scenario prints one line of findings and exits non-zero (AssertionError) when
an observable effect is missing. A scenario may kill its CUDA context; that is why
each gets a fresh process.
"""

from __future__ import annotations

import sys

import torch

from kvcached import vmm

MiB = 1 << 20
PAGE = 2 * MiB


def free_bytes() -> int:
    torch.cuda.synchronize()
    return torch.cuda.mem_get_info(0)[0]


def memory_drops_and_returns() -> None:
    backend = vmm.make_backend("cuda", 0)
    arena = vmm.Arena(backend, 4, 256 * PAGE, PAGE)
    torch.cuda.init()
    before = free_bytes()
    arena.map(list(range(64)))  # 64 groups x 4 ranges x 2 MiB = 512 MiB
    during = free_bytes()
    arena.unmap(list(range(64)))
    after = free_bytes()
    mapped = 64 * 4 * PAGE
    print(f"free before={before >> 20} MiB during={during >> 20} MiB after={after >> 20} MiB mapped={mapped >> 20} MiB")
    assert abs((before - during) - mapped) <= 16 * MiB, (before - during, mapped)
    assert abs(after - before) <= 16 * MiB
    arena.close()


def data_survives_remaps_with_stable_pointers() -> None:
    backend = vmm.make_backend("cuda", 0)
    arena = vmm.Arena(backend, 2, 16 * PAGE, PAGE)
    arena.map(list(range(16)))
    elems = PAGE // 2
    k = vmm.tensor_from_range(backend, arena.range_addr(0), (16, elems), torch.bfloat16, owner=arena)
    v = vmm.tensor_from_range(backend, arena.range_addr(1), (16, elems), torch.bfloat16, owner=arena)
    assert k.device.type == "cuda" and k.data_ptr() == arena.range_addr(0) and v.data_ptr() == arena.range_addr(1)
    expected = torch.randn(16, elems, device="cuda").to(torch.bfloat16)
    k.copy_(expected)
    v.copy_(expected * 2)
    odd = list(range(1, 16, 2))
    for round_ in range(5):
        arena.unmap(odd)
        arena.map(odd)
        k[1::2].fill_(round_)
        v[1::2].fill_(-round_)
    torch.cuda.synchronize()
    assert torch.equal(k[0::2], expected[0::2]) and torch.equal(v[0::2], (expected * 2)[0::2])
    assert torch.equal(k[1::2], torch.full_like(k[1::2], 4))
    assert k.data_ptr() == arena.range_addr(0)
    # A DLPack round trip keeps the address; a matmul over the view runs.
    again = torch.from_dlpack(torch.utils.dlpack.to_dlpack(k))
    assert again.data_ptr() == k.data_ptr()
    out = (k[:2, :4096].float() @ v[:2, :4096].float().T).sum().item()
    print(f"ok: 5 remap rounds of 8 pages, even pages intact, data_ptr stable, matmul={out:.3g}")
    arena.close()


def oom_at_the_device_limit_is_specific() -> None:
    backend = vmm.make_backend("cuda", 0)
    free, total = backend.mem_info()
    num_pages = (total // PAGE) + 64
    arena = vmm.Arena(backend, 1, num_pages * PAGE, PAGE)
    mapped = 0
    batch = 256
    try:
        while True:
            ids = list(range(mapped, min(mapped + batch, num_pages)))
            try:
                arena.map(ids)
                mapped += len(ids)
            except vmm.OutOfMemoryError as exc:
                if batch == 1:
                    print(f"OutOfMemoryError after {mapped * PAGE / 2**30:.1f} GiB of {total / 2**30:.1f} GiB: {exc}")
                    break
                batch = max(1, batch // 4)
    finally:
        # The failed batch rolled back: exactly `mapped` pages are held.
        assert arena.num_mapped_pages == mapped
        arena.unmap(list(range(mapped)))
    assert mapped * PAGE > 0.8 * free
    back = backend.mem_info()[0]
    assert back > 0.95 * free, (back, free)
    arena.close()


def handle_modes_on_cuda() -> None:
    backend = vmm.make_backend("cuda", 0)
    try:
        vmm.Arena(backend, 2, 4 * PAGE, PAGE, "group")
    except ValueError as exc:
        print(f"group mode refused as expected: {exc}")
    else:
        raise AssertionError("group mode with 2 ranges should be refused on CUDA")
    arena = vmm.Arena(backend, 2, 4 * PAGE, PAGE)
    assert arena.handle_mode == "per_range"
    arena.map([0, 1])
    arena.close()
    single = vmm.Arena(backend, 1, 4 * PAGE, PAGE, "group")
    single.map([0])
    single.close()


def raw_driver_floor() -> None:
    backend = vmm.make_backend("cuda", 0)
    import statistics

    for page in (2 * MiB, 128 * MiB):
        ns = vmm._vmm.bench_raw(backend, page, 50)
        print(page >> 20, "MiB:", {k: round(statistics.median(v) / 1000, 1) for k, v in ns.items()}, "us")


if __name__ == "__main__":
    globals()[sys.argv[1]]()
