"""The vLLM integration against vLLM's real modules (CPU; the host backend stands in
for the GPU). Runs in the vLLM test environment (scripts/ci/run_vllm_tests.sh);
skipped where vLLM is not installed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import types

import pytest

vllm = pytest.importorskip("vllm", reason="vLLM is not installed here (see scripts/ci/setup_vllm_env.sh)")

from vllm_helpers import kv_cache_config  # noqa: E402

from kvcached.integrations import vllm as kv_vllm  # noqa: E402
from kvcached.integrations.hooks import when_imported  # noqa: E402

pytestmark = pytest.mark.engine

MiB = 1 << 20


@pytest.fixture(scope="module", autouse=True)
def patched():
    # As in an engine process: arm the patches before the patched modules import.
    os.environ.setdefault("KVCACHED_TRIM_IDLE_S", "0")
    kv_vllm.activate(vllm)
    when_imported("vllm.v1.core.block_pool", kv_vllm.patch_block_pool_module)


def run_python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k not in ("ENABLE_KVCACHED", "KVCACHED_AUTOPATCH")}
    full_env.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env,
                          cwd=os.path.dirname(__file__), timeout=600)


def test_import_hook_patches_a_fresh_process_only_when_enabled():
    code = "import vllm.v1.core.kv_cache_coordinator as c; print(c.BlockPool.__name__)"
    on = run_python(code, ENABLE_KVCACHED="true")
    off = run_python(code)
    assert on.returncode == 0, on.stderr[-2000:]
    assert on.stdout.split()[-1] == "ElasticBlockPool"
    assert off.stdout.split()[-1] == "BlockPool"


def test_unsupported_version_refuses_naming_the_range():
    fake = types.SimpleNamespace(__version__="0.19.1")
    with pytest.raises(RuntimeError, match=r"supports vLLM 0\.26\.0–0\.34\.0, found 0\.19\.1"):
        kv_vllm.activate(fake)  # type: ignore[arg-type]


def new_pool(num_blocks: int = 4096, caching: bool = True):
    from vllm.v1.core.block_pool import BlockPool

    from kvcached.integrations.vllm.block_pool import ElasticBlockPool

    assert BlockPool is ElasticBlockPool
    return ElasticBlockPool(num_gpu_blocks=num_blocks, enable_caching=caching, hash_block_size=16)


def test_memory_is_mapped_only_under_live_blocks_and_returns():
    pool = new_pool()
    arena = pool.kv.mapper
    idle = arena.mapped_bytes
    assert arena.mapped_pages() == [0]
    blocks = pool.get_new_blocks(300)
    assert arena.mapped_bytes > idle
    assert [b.block_id for b in blocks] == list(range(1, 301))  # vLLM's own order
    pool.kv.check_integrity()
    pool.free_blocks(reversed(blocks))
    pool.kv.maintain()
    pool.kv.maintain()
    assert arena.mapped_bytes <= idle + pool.kv.group_bytes * pool.kv.reserve_pages
    assert pool.get_num_free_blocks() == 4095
    pool.kv.check_integrity()


def test_freed_cached_blocks_asked_to_go_first_head_the_queue_and_stay_accounted():
    import inspect

    from vllm.v1.core.block_pool import BlockPool

    from kvcached.integrations.vllm.states import CACHED

    if "evict_first" not in inspect.signature(BlockPool.__mro__[1].free_blocks).parameters:
        pytest.skip("free_blocks(..., evict_first) is vLLM 0.34+")
    from vllm.v1.core.kv_cache_utils import BlockHash, make_block_hash_with_group_id

    pool = new_pool()
    kv = pool.kv
    blocks = pool.get_new_blocks(2 * kv.blocks_per_page)
    for i, block in enumerate(blocks):  # cached contents, as after a finished prompt
        block.block_hash = make_block_hash_with_group_id(BlockHash(i.to_bytes(8, "big")), 0)
    pool.free_blocks(reversed(blocks), evict_first=True)
    # At the head of the queue in the order given (reused first), not at its LRU tail.
    assert [b.block_id for b in pool._peek(len(blocks))] == [b.block_id for b in reversed(blocks)]
    assert all(kv.block_state[b.block_id] == CACHED for b in blocks)
    assert pool.get_num_free_blocks() == 4095
    kv.check_integrity()


def test_vllms_own_extensible_kv_cache_stays_off_and_asking_for_it_is_refused():
    from vllm.config import CacheConfig, ParallelConfig
    from vllm.config.vllm import VllmConfig

    if not hasattr(VllmConfig, "_resolve_extensible_kv_cache"):
        pytest.skip("the extensible KV cache is vLLM 0.34+")
    from vllm.platforms import current_platform

    def resolve(requested):
        # The checks need only these parts of a VllmConfig; the platform passes for CUDA.
        config = types.SimpleNamespace(cache_config=CacheConfig(enable_extensible_kv_cache=requested),
                                       kv_transfer_config=None, parallel_config=ParallelConfig())
        VllmConfig._resolve_extensible_kv_cache(config)  # type: ignore[arg-type]
        return config.cache_config

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(current_platform, "is_cuda_alike", lambda: True)
        cache = resolve(None)
        assert cache.enable_extensible_kv_cache is False
        assert cache.resolved_gpu_memory_utilization == CacheConfig.DEFAULT_GPU_MEMORY_UTILIZATION
        with pytest.raises(ValueError, match="drop --enable-extensible-kv-cache or unset ENABLE_KVCACHED"):
            resolve(True)
        assert resolve(False).enable_extensible_kv_cache is False


def test_start_up_asks_what_vllm_would_without_refusing_memory_other_engines_hold():
    import math

    import vllm.v1.worker.gpu_worker as gpu_worker
    import vllm.v1.worker.utils as worker_utils
    from vllm.config import CacheConfig

    GiB = 1 << 30
    snapshot = types.SimpleNamespace(total_memory=80 * GiB, free_memory=10 * GiB, device_="cuda:0")
    # 0.34 leaves the utilization unset by default (then 0.92 without its extensible cache).
    unset_allowed = hasattr(CacheConfig, "resolved_gpu_memory_utilization")
    for utilization, expected in [(0.5, 0.5), *([(None, 0.92)] if unset_allowed else [])]:
        cache = CacheConfig(gpu_memory_utilization=utilization)
        with pytest.raises(ValueError, match="Free memory on device"):
            worker_utils.request_memory(snapshot, cache)  # vLLM's own: 10 GiB free is too little
        assert gpu_worker.request_memory(snapshot, cache) == math.ceil(80 * GiB * expected)


def test_block_choice_is_identical_to_vllms():
    from kvcached.integrations.vllm.block_pool import ElasticBlockPool

    plain = ElasticBlockPool.__mro__[1](num_gpu_blocks=512, enable_caching=True, hash_block_size=16)
    ours = new_pool(512)
    held_plain, held_ours = [], []
    for step in range(40):
        n = 1 + (step * 7) % 23
        if n <= plain.get_num_free_blocks():
            a, b = plain.get_new_blocks(n), ours.get_new_blocks(n)
            assert [x.block_id for x in a] == [x.block_id for x in b]
            held_plain.append(a)
            held_ours.append(b)
        if step % 3 == 2:
            plain.free_blocks(reversed(held_plain.pop(0)))
            ours.free_blocks(reversed(held_ours.pop(0)))
        assert plain.get_num_free_blocks() == ours.get_num_free_blocks()
    ours.kv.check_integrity()


def test_limit_caps_what_vllm_may_take_and_is_never_exceeded():
    pool = new_pool()
    kv = pool.kv
    kv.set_limit_bytes(3 * kv.group_bytes)
    assert pool.get_num_free_blocks() <= 3 * kv.blocks_per_page
    can = pool.get_num_free_blocks()
    blocks = pool.get_new_blocks(can)
    assert pool.get_num_free_blocks() == 0
    assert kv.mapper.mapped_bytes <= 3 * kv.group_bytes
    with pytest.raises(ValueError):
        pool.get_new_blocks(1)  # vLLM's contract; allocate_slots asks get_num_free_blocks first
    pool.free_blocks(blocks)
    assert pool.get_num_free_blocks() == can


def test_a_full_budget_hands_out_blocks_on_mapped_pages_first():
    pool = new_pool()
    kv = pool.kv
    held = pool.get_new_blocks(2 * kv.blocks_per_page)  # two page groups' worth
    pool.free_blocks(held[: kv.blocks_per_page])  # one group's worth free again, still mapped
    mapped = kv.mapper.mapped_pages()
    kv.budget_room = lambda: 0  # the GPU budget is full: nothing more may be mapped
    can = pool.get_num_free_blocks()
    assert can == kv.num_blocks_on_mapped_pages() >= kv.blocks_per_page
    blocks = pool.get_new_blocks(can)  # vLLM's queue head is unmapped: ours come first
    assert kv.mapper.mapped_pages() == mapped
    assert all(b.block_id // kv.blocks_per_page in mapped for b in blocks)
    kv.check_integrity()


def cache(pool, blocks) -> None:
    """Give ``blocks`` prefix-cache entries, as a finished request's full blocks have."""
    from vllm.v1.core.kv_cache_utils import make_block_hash_with_group_id

    for block in blocks:
        key = make_block_hash_with_group_id(block.block_id.to_bytes(32, "big"), 0)
        block.set_block_hash(key)
        pool.cached_block_hash_to_block.insert(key, block)


def test_the_prefix_cache_resets_under_a_limit():
    pool = new_pool()
    kv = pool.kv
    kv.set_limit_bytes(4 * kv.group_bytes)  # capacity capped well below vLLM's own free count
    blocks = pool.get_new_blocks(10)
    cache(pool, blocks)
    pool.free_blocks(reversed(blocks))
    assert pool.get_num_free_blocks() < pool.num_gpu_blocks - 1  # what the scheduler sees
    assert kv.num_cached == 10
    assert pool.reset_prefix_cache()  # idle: every block is free by vLLM's count
    assert kv.num_cached == 0 and all(b.block_hash is None for b in blocks)
    assert pool.get_num_free_blocks() < pool.num_gpu_blocks - 1  # the cap is back
    held = pool.get_new_blocks(1)
    assert not pool.reset_prefix_cache()  # a block in use: refused, as vLLM does
    pool.free_blocks(held)
    kv.check_integrity()


def test_on_a_shared_gpu_cached_blocks_go_out_before_a_new_page_is_mapped():
    import time

    for budget in (None, 1 << 40):  # alone on the GPU, then sharing a budget with others
        pool = new_pool()
        kv = pool.kv
        kv.budget_room = lambda b=budget: b
        kv.idle_cache_bytes = 0  # keep no prefix cache beyond what is in use
        bpp = kv.blocks_per_page
        first = pool.get_new_blocks(3 * bpp - 1)  # pages 0-2 full (block 0 is vLLM's null block)
        finished = [b for b in first if b.block_id % 2]
        cache(pool, finished)
        pool.free_blocks(reversed(finished))  # half of each page cached; the pages stay mapped
        deadline = time.monotonic() + 5
        while 3 not in kv.mapper.mapped_pages() and time.monotonic() < deadline:
            time.sleep(0.01)  # the prefetch maps page 3 ahead: an empty reserve, not a reason to use it
        assert 3 in kv.mapper.mapped_pages()
        again = pool.get_new_blocks(bpp)
        ids = {b.block_id for b in again}
        pages_in_use = {b.block_id // bpp for b in first + again if b.ref_cnt}
        if budget is None:  # vLLM's order: never-used blocks before cached ones, on a new page
            assert min(ids) == 3 * bpp and len(pages_in_use) == 4
        else:  # packed: the cached blocks on mapped pages (evicted), lowest page first
            assert ids <= {b.block_id for b in finished} and len(pages_in_use) == 3
            assert all(b.block_hash is None for b in again)
        kv.check_integrity()


def test_on_a_shared_gpu_a_request_grows_on_its_own_page_group():
    """Through vLLM's own KVCacheManager: while packing, a running request's next block goes
    to the page group of its last one, a new request's prompt to the lowest group with room
    for all of it — not to whatever blocks vLLM's free queue holds first."""
    import torch
    from vllm.sampling_params import SamplingParams
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.request import Request

    spec = FullAttentionSpec(block_size=16, num_kv_heads=1, head_size=1, dtype=torch.float32)
    config = KVCacheConfig(num_blocks=4096, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(["layer"], spec)])
    manager = KVCacheManager(config, max_model_len=1 << 16, scheduler_block_size=16, hash_block_size=16, enable_caching=False)
    pool = manager.block_pool
    kv = pool.kv
    kv.pack = "on"
    bpp = kv.blocks_per_page
    quarter = bpp // 4
    assert quarter >= 2

    def request(name: str, num_blocks: int) -> Request:
        r = Request(name, list(range(16 * num_blocks)), SamplingParams(max_tokens=1 << 12), None)
        assert manager.allocate_slots(r, 16 * num_blocks) is not None
        r.num_computed_tokens = 16 * num_blocks
        return r

    def groups(r: Request) -> set[int]:
        return {b // bpp for b in manager.get_block_ids(r.request_id)[0]}

    first = request("first", bpp - 1)  # page group 0 full (block 0 is vLLM's null block)
    quarters = [request(f"q{i}", quarter) for i in range(8)]  # groups 1 and 2, four requests each
    for i in (4, 5, 0):  # two finish in group 2, then one in group 1: vLLM's queue head is in group 1
        manager.free(quarters[i])
    grower = quarters[6]
    assert groups(grower) == {2}
    assert manager.allocate_slots(grower, 1) is not None  # one token more: one block more
    assert groups(grower) == {2}
    newcomer = request("new", quarter + 1)  # only group 2 has room for all of it
    assert groups(newcomer) == {2}
    kv.check_integrity()
    del first


def test_packing_evicts_one_off_cache_before_a_prefix_that_was_hit():
    pool = new_pool()
    kv = pool.kv
    kv.pack, kv.idle_cache_bytes = "on", 0  # a shared GPU; no prefix cache kept for its own sake
    bpp = kv.blocks_per_page
    first = pool.get_new_blocks(2 * bpp - 1)  # page groups 0 and 1 full
    cache(pool, first)
    prefix, others = first[:8], first[8:]
    pool.free_blocks(reversed(first))  # all cached; vLLM's queue holds the prefix first (LRU)
    pool.touch(prefix)  # a new request hits the prefix ...
    pool.free_blocks(reversed(prefix))  # ... and finishes
    again = pool.get_new_blocks(len(others))  # as many as there are one-off cached blocks
    assert {b.block_id for b in again} == {b.block_id for b in others}
    assert all(b.block_hash is not None for b in prefix)  # the prefix is still cached
    kv.check_integrity()


def test_the_page_after_the_one_in_use_is_mapped_ahead_so_the_scheduler_never_waits():
    import time

    pool = new_pool()
    kv = pool.kv
    bpp = kv.blocks_per_page
    held = pool.get_new_blocks(bpp - 4)  # page 0 nearly full (block 0 is vLLM's null block)
    deadline = time.monotonic() + 5
    while kv.mapper.mapped_pages()[:2] != [0, 1] and time.monotonic() < deadline:
        time.sleep(0.01)  # the prefetch thread maps page 1 before anyone asks for it
    assert kv.mapper.mapped_pages()[:2] == [0, 1]
    sync_maps = kv.stats().num_sync_maps
    held += pool.get_new_blocks(8)  # crosses into page 1
    assert kv.stats().num_sync_maps == sync_maps  # no driver call on the scheduler's path
    kv.check_integrity()


def test_a_refused_map_waits_for_memory_and_then_gives_up(monkeypatch):
    import time

    monkeypatch.setenv("KVCACHED_MAP_WAIT_S", "0.2")
    pool = new_pool()
    kv = pool.kv
    kv.budget_room = lambda: None  # the capacity check sees room ...
    monkeypatch.setattr(kv, "ensure_mapped", lambda pages: False)  # ... but every map is refused
    t0 = time.monotonic()
    with pytest.raises(MemoryError, match=r"no memory for 100 KV blocks after 0\.2 s"):
        pool.get_new_blocks(100)
    assert time.monotonic() - t0 >= 0.2
    assert pool.get_num_free_blocks() == 4095  # nothing was handed out
    kv.check_integrity()


def test_over_its_share_new_requests_wait_and_running_ones_go_on():
    from vllm.v1.request import RequestStatus

    from kvcached.integrations import vllm as integration

    pool = new_pool()
    calls = []

    class Manager:  # stands in for KVCacheManager: the patch wraps its allocate_slots
        block_pool = pool

        def allocate_slots(self, request, num_new_tokens, **kwargs):
            calls.append(request.status)
            return None if num_new_tokens > 1000 else ["blocks"]

    integration._patch_kv_cache_manager(types.SimpleNamespace(KVCacheManager=Manager))
    manager, running = Manager(), types.SimpleNamespace(status=RequestStatus.RUNNING, request_id="running")
    waiting = types.SimpleNamespace(status=RequestStatus.WAITING, request_id="waiting")
    held = pool.get_new_blocks(64)
    pool.kv.set_share_bytes(32 * pool.kv.block_bytes)  # a peer is short of memory; we hold 64 blocks
    assert manager.allocate_slots(waiting, 16) is None and calls == []  # waits, vLLM is not even asked
    assert manager.allocate_slots(running, 16) == ["blocks"]  # a running request still grows
    pool.free_blocks(held)
    assert manager.allocate_slots(waiting, 16) == ["blocks"]  # back under the share
    pool.kv.set_share_bytes(None)
    kv = pool.kv
    kv.budget_room = lambda: 0  # the budget is full ...
    assert manager.allocate_slots(waiting, 5000) is None  # ... and vLLM refused: the peers are told
    assert kv.stats().num_denied == 1

def test_the_coordinator_builds_the_elastic_pool():
    import vllm.v1.core.kv_cache_coordinator as coordinator
    from vllm.v1.core.kv_cache_manager import KVCacheManager  # noqa: F401 - the patched chain imports

    from kvcached.integrations.vllm.block_pool import ElasticBlockPool

    assert coordinator.BlockPool is ElasticBlockPool


def test_kv_tensors_have_vllms_shapes_and_strides_over_the_arena():
    import torch
    import vllm.v1.worker.gpu.attn_utils as attn_utils
    import vllm.v1.worker.utils as worker_utils
    from vllm.v1.kv_cache_layout import KVCacheLayout

    from kvcached.integrations.vllm import runtime

    config, layers = kv_cache_config(512, 4)
    num_blocks, page = config.num_blocks, config.kv_cache_groups[0].kv_cache_spec.page_size_bytes
    ours = attn_utils.allocate_kv_cache(config, torch.device("cpu"), KVCacheLayout.LBNHC)
    theirs = worker_utils.allocate_kv_cache(config, torch.device("cpu"), KVCacheLayout.LBNHC)
    kv = runtime.worker_kv()
    assert kv is not None and kv.num_blocks == num_blocks and kv.blocks_per_page == (2 * MiB) // page
    for name in layers:
        assert ours[name].shape == theirs[name].shape and ours[name].stride() == theirs[name].stride()
        assert ours[name].dtype == theirs[name].dtype
    assert ours[layers[0]].data_ptr() == kv.arena.base_addr
    assert ours[layers[1]].data_ptr() == kv.arena.range_addr(1)
    # Page group 0 (the null block) is mapped; others map on demand and keep data across remaps.
    assert kv.arena.mapped_pages() == [0]
    kv.arena.map([1])
    first, second = ours[layers[2]][3], ours[layers[2]][kv.blocks_per_page + 1]
    first.copy_(torch.randn(first.shape).to(first.dtype))
    expected = first.clone()
    second.fill_(1)
    kv.arena.unmap([1])
    kv.arena.map([1])
    assert torch.equal(ours[layers[2]][3], expected)
    assert ours[layers[2]][kv.blocks_per_page + 1].abs().sum().item() == 0  # fresh memory

