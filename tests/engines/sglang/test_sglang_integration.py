"""The SGLang integration against SGLang's real memory pool, allocators and radix cache
(CPU; the host backend stands in for the GPU). Runs once in each SGLang test environment
(scripts/ci/run_sglang_tests.sh: 0.5.17 and 0.5.23), whichever SGLang is installed;
skipped where none is. Version-specific expectations branch on ``SGLANG_VERSION``.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import time
import types

import pytest

sglang = pytest.importorskip("sglang", reason="SGLang is not installed here (see scripts/ci/setup_sglang_env.sh)")
torch = pytest.importorskip("torch")

from kvcached.integrations import sglang as kv_sglang  # noqa: E402

pytestmark = pytest.mark.engine
SGLANG_VERSION = sglang.__version__

NUM_LAYERS, NUM_HEADS, HEAD_DIM = 2, 2, 64  # bf16: 256 bytes per slot per range, 8192 slots per 2 MiB page


@pytest.fixture(scope="module", autouse=True)
def patched():
    os.environ.setdefault("KVCACHED_TRIM_IDLE_S", "0")
    os.environ.setdefault("KVCACHED_RESERVE_MIN_PAGES", "0")
    kv_sglang.activate(sglang)
    for name in ("sglang.srt.mem_cache.memory_pool", "sglang.srt.mem_cache.allocator",
                 "sglang.srt.mem_cache.radix_cache", "sglang.srt.mem_cache.kv_cache_configurator",
                 "sglang.srt.managers.scheduler_components.invariant_checker",
                 "sglang.srt.managers.scheduler_components.weight_updater"):
        importlib.import_module(name)  # as in an engine: each patch applies on import


def new_kv(size: int = 4 * 8192, page_size: int = 1):
    from kvcached.integrations.sglang.pools import ElasticMHATokenToKVPool

    return ElasticMHATokenToKVPool(
        size=size, page_size=page_size, dtype=torch.bfloat16, head_num=NUM_HEADS, head_dim=HEAD_DIM,
        layer_num=NUM_LAYERS, device="cpu", enable_memory_saver=False, enable_alt_stream=False,
    )


def new_allocator(kv, page_size: int = 1):
    from kvcached.integrations.sglang import allocators

    if page_size == 1:
        return allocators.ElasticTokenToKVPoolAllocator(kv.size, torch.bfloat16, "cpu", kv, False)
    return allocators.ElasticPagedTokenToKVPoolAllocator(kv.size, page_size, torch.bfloat16, "cpu", kv, False)


def wait_for(predicate, timeout_s: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def run_python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k not in ("ENABLE_KVCACHED", "KVCACHED_AUTOPATCH")}
    full_env.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env,
                          cwd=os.path.dirname(__file__), timeout=300)


# -- activation -------------------------------------------------------------------------


def test_import_hook_routes_sglang_seams_only_when_enabled():
    # 0.5.23: the platform seams (and the page-size-1 allocator by name); 0.5.17: the
    # configurator's names for both pools and both allocators.
    if SGLANG_VERSION == "0.5.23":
        code = (
            "import sglang.srt.mem_cache.kv_cache_configurator as c, sglang.srt.mem_cache.allocator\n"
            "from sglang.srt.platforms import current_platform as p\n"
            "print(p.get_kv_pool_cls(kind='mha'), p.get_kv_pool_cls(kind='mla'), p.get_paged_allocator_cls(),"
            " c.TokenToKVPoolAllocator.__name__)"
        )
    else:
        code = (
            "import sglang.srt.mem_cache.kv_cache_configurator as c\n"
            "print(c.MHATokenToKVPool.__name__, c.MLATokenToKVPool.__name__, c.PagedTokenToKVPoolAllocator.__name__,"
            " c.TokenToKVPoolAllocator.__name__)"
        )
    on = run_python(code, ENABLE_KVCACHED="true")
    off = run_python(code)
    assert on.returncode == 0, on.stderr[-3000:]
    assert "ElasticMHATokenToKVPool" in on.stdout and "ElasticMLATokenToKVPool" in on.stdout
    assert "ElasticPagedTokenToKVPoolAllocator" in on.stdout and on.stdout.split()[-1] == "ElasticTokenToKVPoolAllocator"
    assert off.returncode == 0, off.stderr[-3000:]
    assert "Elastic" not in off.stdout and off.stdout.split()[-1] == "TokenToKVPoolAllocator"


@pytest.mark.parametrize("version", ["0.5.9", "0.5.20", "0.5.24"])
def test_unsupported_version_refuses_naming_the_supported_ones(version):
    with pytest.raises(RuntimeError, match=rf"supports SGLang 0\.5\.17 and 0\.5\.23, found {version}"):
        kv_sglang.activate(types.SimpleNamespace(__version__=version))  # type: ignore[arg-type]
    assert kv_sglang.module_for(SGLANG_VERSION) is not None  # the installed one is supported


@pytest.mark.skipif(SGLANG_VERSION != "0.5.23", reason="the platform KV pool seam is 0.5.23's")
def test_pool_seam_leaves_other_kinds_to_sglang():
    """The configurator resolves every kind (mha, mla, dsa) whatever it builds; asking for
    the DSA pool must not stop the engine (a DSA pool actually built is refused later)."""
    from sglang.srt.mem_cache.kv_cache_configurator import KVCacheConfigurator
    from sglang.srt.mem_cache.memory_pool import DSATokenToKVPool, MHATokenToKVPool, MLATokenToKVPool

    from kvcached.integrations.sglang.pools import ElasticMHATokenToKVPool, ElasticMLATokenToKVPool

    resolve = KVCacheConfigurator._resolve_kv_pool_class
    assert resolve(None, kind="mha", default=MHATokenToKVPool) is ElasticMHATokenToKVPool
    assert resolve(None, kind="mla", default=MLATokenToKVPool) is ElasticMLATokenToKVPool
    assert resolve(None, kind="dsa", default=DSATokenToKVPool) is DSATokenToKVPool


def test_a_pool_sglang_picks_but_kvcached_lacks_is_refused():
    from sglang.srt.mem_cache.kv_cache_configurator import KVCacheConfigurator
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

    from kvcached.integrations.sglang.elastic import live_stores
    from kvcached.integrations.sglang.patches import check_pool_choice

    assert hasattr(KVCacheConfigurator._build_token_to_kv_pool, "__wrapped__")  # the check is in place
    before = set(live_stores())
    leftover = new_kv(size=8192)  # as a composite pool would make its parts
    own = MHATokenToKVPool(size=1024, page_size=1, dtype=torch.bfloat16, head_num=NUM_HEADS, head_dim=HEAD_DIM,
                           layer_num=NUM_LAYERS, device="cpu", enable_memory_saver=False, enable_alt_stream=False)
    with pytest.raises(NotImplementedError, match="chose its MHATokenToKVPool KV pool"):
        check_pool_choice(own, before)
    assert leftover.kvcached_store.closed and set(live_stores()) == before
    ours = new_kv(size=8192)
    try:
        check_pool_choice(ours, set())  # kvcached's own passes
    finally:
        ours._clear_buffers()


def test_speculative_decoding_is_refused_before_any_pool_is_built():
    from sglang.srt.mem_cache.kv_cache_configurator import KVCacheConfigurator

    with pytest.raises(NotImplementedError, match="speculative decoding"):
        KVCacheConfigurator._build_token_to_kv_pool(types.SimpleNamespace(is_draft_worker=True))


def test_tensor_parallel_is_refused(monkeypatch):
    from sglang.srt.distributed import parallel_state

    monkeypatch.setattr(parallel_state, "model_parallel_is_initialized", lambda: True)
    monkeypatch.setattr(parallel_state, "get_tensor_model_parallel_world_size", lambda: 2)
    monkeypatch.setattr(parallel_state, "get_pipeline_model_parallel_world_size", lambda: 1)
    with pytest.raises(NotImplementedError, match="tensor parallel size 2"):
        new_kv(size=8192)
    monkeypatch.setattr(parallel_state, "get_tensor_model_parallel_world_size", lambda: 1)
    new_kv(size=8192)._clear_buffers()  # one rank: served


# -- the pool ---------------------------------------------------------------------------


def test_pool_buffers_have_sglangs_shapes_and_start_unmapped():
    kv = new_kv(size=4 * 8192, page_size=16)
    store = kv.kvcached_store
    try:
        assert len(kv.k_buffer) == len(kv.v_buffer) == NUM_LAYERS
        for k, v in zip(kv.k_buffer, kv.v_buffer, strict=True):
            assert k.shape == v.shape == (4 * 8192 + 16, NUM_HEADS, HEAD_DIM)
            assert k.dtype == torch.bfloat16 and k.is_contiguous() and v.is_contiguous()
        assert kv.k_buffer[0].data_ptr() == store.pool.kv_tensors[0].data_ptr()
        stats = store.pool.stats()
        assert stats.num_pages_mapped == 1  # only the pinned group (slot 0's page)
        assert stats.virtual_bytes >= 2 * NUM_LAYERS * (4 * 8192 + 16) * NUM_HEADS * HEAD_DIM * 2
        assert torch.count_nonzero(kv.k_buffer[0][:16]) == 0
    finally:
        kv._clear_buffers()
    assert store.closed


def test_mla_pool_buffers():
    from kvcached.integrations.sglang.pools import ElasticMLATokenToKVPool

    kv = ElasticMLATokenToKVPool(size=8192, page_size=1, dtype=torch.bfloat16, kv_lora_rank=64,
                                 qk_rope_head_dim=32, layer_num=NUM_LAYERS, device="cpu", enable_memory_saver=False)
    try:
        assert [tuple(b.shape) for b in kv.kv_buffer] == [(8193, 1, 96)] * NUM_LAYERS
        alloc = new_allocator(kv)
        slots = alloc.alloc(100)
        kv.kv_buffer[1][slots] = torch.ones(100, 1, 96, dtype=torch.bfloat16)
        assert torch.all(kv.kv_buffer[1][slots] == 1)
        alloc.free(slots)
    finally:
        kv._clear_buffers()


# -- allocators -------------------------------------------------------------------------


@pytest.mark.parametrize("page_size", [1, 16])
def test_alloc_maps_on_demand_and_free_returns_pages(page_size):
    kv = new_kv(size=4 * 8192, page_size=page_size)
    alloc, pool = new_allocator(kv, page_size), kv.kvcached_store.pool
    try:
        group = pool.group_bytes
        assert alloc.available_size() == 4 * 8192  # the whole slot space can be mapped
        slots = alloc.alloc(3 * 8192)
        assert slots is not None and slots.numel() == 3 * 8192
        assert 0 not in slots.tolist() and len(set(slots.tolist())) == slots.numel()
        assert pool.stats().mapped_bytes >= 3 * group
        assert alloc.index_free_tokens() == 8192
        assert alloc.alloc(2 * 8192) is None  # beyond the slot space: refused, nothing taken
        assert alloc.num_pages_in_use == 3 * 8192 // page_size
        alloc.free(slots)
        assert alloc.num_pages_in_use == 0
        assert wait_for(lambda: pool.stats().mapped_bytes == group), pool.stats()
        pool.check_integrity()
    finally:
        kv._clear_buffers()


def test_double_free_is_caught():
    kv = new_kv()
    alloc = new_allocator(kv)
    try:
        slots = alloc.alloc(10)
        alloc.free(slots)
        with pytest.raises(ValueError):
            alloc.free(slots)
    finally:
        kv._clear_buffers()


def test_paged_extend_and_decode_use_sglangs_index_kernels():
    page_size = 16
    kv = new_kv(size=4 * 8192, page_size=page_size)
    alloc = new_allocator(kv, page_size)
    try:
        prefix = torch.tensor([0, 0], dtype=torch.int64)
        seq = torch.tensor([20, 35], dtype=torch.int64)
        last = torch.tensor([-1, -1], dtype=torch.int64)
        out = alloc.alloc_extend(prefix, prefix, seq, seq, last, 55)
        assert out is not None and out.numel() == 55
        first, second = out[:20], out[20:]
        for req in (first, second):  # whole pages: page-aligned starts, consecutive slots within
            for start in range(0, req.numel(), page_size):
                chunk = req[start : start + page_size]
                assert chunk[0] % page_size == 0
                assert torch.equal(chunk - chunk[0], torch.arange(chunk.numel()))
        assert alloc.num_pages_in_use == 2 + 3
        assert alloc.free_pages.numel() == 0  # nothing left behind locally
        dec = alloc.alloc_decode(seq + 1, seq + 1, torch.stack([first[-1], second[-1]]))
        assert dec.tolist() == [first[-1].item() + 1, second[-1].item() + 1]  # room left on both pages
        alloc.free(torch.cat([out, dec]))
        assert alloc.num_pages_in_use == 0 and alloc.index_free_tokens() == 4 * 8192
    finally:
        kv._clear_buffers()


def test_data_written_through_the_buffers_survives_other_pages_remapping():
    kv = new_kv(size=4 * 8192)
    alloc, pool = new_allocator(kv), kv.kvcached_store.pool
    try:
        keep = alloc.alloc(100)
        value = torch.randn(100, NUM_HEADS, HEAD_DIM).to(torch.bfloat16)
        for layer in range(NUM_LAYERS):
            kv.set_kv_buffer(types.SimpleNamespace(layer_id=layer), keep, value, -value)
        churn = alloc.alloc(3 * 8192)  # maps more page groups
        alloc.free(churn)
        assert wait_for(lambda: pool.stats().num_pages_unmapped_total > 0)
        again = alloc.alloc(2 * 8192)  # and maps them again
        for layer in range(NUM_LAYERS):
            assert torch.equal(kv.get_key_buffer(layer)[keep], value)
            assert torch.equal(kv.get_value_buffer(layer)[keep], -value)
        alloc.free(torch.cat([keep, again]))
    finally:
        kv._clear_buffers()


def test_limit_bounds_available_size_and_allocation():
    kv = new_kv(size=4 * 8192)
    alloc, pool = new_allocator(kv), kv.kvcached_store.pool
    try:
        pool.set_limit_bytes(2 * pool.group_bytes)
        assert alloc.available_size() == 2 * 8192 - 1  # slot 0 is pinned
        assert alloc.index_free_tokens() == 4 * 8192  # the leak check still sees every slot
        assert alloc.alloc(2 * 8192) is None
        got = alloc.alloc(2 * 8192 - 1)
        assert got is not None and alloc.available_size() == 0
        alloc.free(got)
    finally:
        kv._clear_buffers()


def test_clear_returns_everything():
    kv = new_kv()
    alloc, pool = new_allocator(kv), kv.kvcached_store.pool
    try:
        alloc.alloc(5000)
        alloc.clear()
        assert alloc.num_pages_in_use == 0 and pool.stats().num_blocks_used == 0
    finally:
        kv._clear_buffers()


# -- the scheduler's leak check, release / resume, profiling ---------------------------


def test_leak_check_counts_held_slots_not_mapped_memory(monkeypatch):
    from sglang.srt.managers.scheduler_components import invariant_checker as ic

    monkeypatch.setattr(ic, "get_parallel", lambda: types.SimpleNamespace(dcp_enabled=False), raising=False)  # 0.5.23

    kv = new_kv(size=4 * 8192)
    alloc, pool = new_allocator(kv), kv.kvcached_store.pool
    try:
        pool.set_limit_bytes(2 * pool.group_bytes)  # available_size() is far below the slot space
        checker = types.SimpleNamespace(token_to_kv_pool_allocator=alloc)
        seen = {}

        def fake_invariant(self, name, available, evictable, protected, session_held, total, uncached):
            seen["available"] = available
            return available + evictable + protected + uncached != total, ""

        checker._check_pool_invariant = types.MethodType(fake_invariant, checker)
        held = alloc.alloc(1000)
        fields = dict(full_num_used=0, full_token_usage=0.0, full_available_size=alloc.available_size(),
                      full_evictable_size=0)
        if SGLANG_VERSION == "0.5.23":
            fields["full_capacity"] = 4 * 8192
        stats = ic.PoolStats(**fields)
        for key, value in dict(is_hybrid_swa=False, is_hybrid_ssm=False, max_total_num_tokens=4 * 8192,
                               server_args=types.SimpleNamespace(dcp_size=1),  # 0.5.17
                               tree_cache=types.SimpleNamespace(protected_size=lambda: 0),
                               pool_stats_observer=types.SimpleNamespace(session_held_tokens=lambda: 0)).items():
            setattr(checker, key, value)
        leak, _ = ic.SchedulerInvariantChecker._check_full_pool(checker, stats, uncached=1000)
        assert not leak and seen["available"] == 4 * 8192 - 1000
        alloc.free(held)
    finally:
        kv._clear_buffers()


def test_release_takes_kv_memory_to_zero_and_resume_brings_the_pinned_group_back(monkeypatch):
    """Through SGLang's own ``release_memory_occupation`` / ``resume_memory_occupation``
    (kv_cache tag): flushed, then nothing mapped, the pinned page group included, and the
    control plane shows 0 and SLEEPING; after resume the padded page is mapped and zero
    and allocation works again."""
    from sglang.srt.managers.io_struct import ReleaseMemoryOccupationReqInput, ResumeMemoryOccupationReqInput
    from sglang.srt.managers.scheduler_components import weight_updater as wu

    from kvcached.control import Controller
    from kvcached.integrations.sglang.elastic import live_stores

    manager = wu.SchedulerWeightUpdaterManager
    assert hasattr(manager.release_memory_occupation, "__wrapped__")  # the patch is in place
    assert hasattr(manager.resume_memory_occupation, "__wrapped__")
    shm = f"kvcached-test-sglang-rel-{os.getpid()}"
    monkeypatch.setenv("KVCACHED_SHM_NAME", shm)
    monkeypatch.setenv("KVCACHED_ENGINE_NAME", "released-llama")
    kv = new_kv(size=4 * 8192)
    alloc, store = new_allocator(kv), kv.kvcached_store
    pool = store.pool
    paused: list[str] = []
    updater = types.SimpleNamespace(
        is_fully_idle=lambda **_: True, offload_tags=set(), scheduler=None,
        memory_saver_adapter=types.SimpleNamespace(pause=paused.append, resume=paused.remove),
        flush_cache=lambda: alloc.clear() or True,  # SGLang's flush returns every slot
    )
    try:
        assert store in live_stores()
        held = alloc.alloc(3 * 8192)  # in use when the release comes: the flush frees it
        kv.k_buffer[0][0] = 7  # garbage in the padded page
        assert pool.arena.mapped_bytes >= 3 * pool.group_bytes
        manager.release_memory_occupation(updater, ReleaseMemoryOccupationReqInput(tags=["kv_cache"]))
        assert paused == ["kv_cache"] and held is not None
        assert store.released and pool.arena.mapped_bytes == 0  # the pinned group too
        assert alloc.available_size() == 0 and alloc.alloc(1) is None
        with Controller.open(shm) as ctl:
            info = ctl.snapshot().engine("released-llama")
            assert info.mapped_bytes == 0 and info.state.name == "SLEEPING"
        assert store.release() == 0  # again: nothing changes
        manager.resume_memory_occupation(updater, ResumeMemoryOccupationReqInput(tags=["kv_cache"]))
        assert not store.released and pool.arena.mapped_bytes == pool.group_bytes
        assert torch.count_nonzero(kv.k_buffer[0][0]) == 0  # the padded page came back zeroed
        assert alloc.available_size() == 4 * 8192
        got = alloc.alloc(8192)
        assert got is not None
        kv.set_kv_buffer(types.SimpleNamespace(layer_id=0), got, torch.ones(8192, NUM_HEADS, HEAD_DIM,
                         dtype=torch.bfloat16), torch.ones(8192, NUM_HEADS, HEAD_DIM, dtype=torch.bfloat16))
        with Controller.open(shm) as ctl:
            info = ctl.snapshot().engine("released-llama")
            assert info.mapped_bytes >= 2 * pool.group_bytes and info.state.name == "RUNNING"
        pool.check_integrity()
    finally:
        kv._clear_buffers()
        Controller.unlink(shm)


def test_release_with_other_tags_leaves_kv_memory_alone():
    from sglang.srt.managers.io_struct import ReleaseMemoryOccupationReqInput
    from sglang.srt.managers.scheduler_components import weight_updater as wu

    kv = new_kv(size=4 * 8192)
    alloc, store = new_allocator(kv), kv.kvcached_store
    updater = types.SimpleNamespace(is_fully_idle=lambda **_: True, offload_tags=set(), scheduler=None,
                                    memory_saver_adapter=types.SimpleNamespace(pause=lambda tag: None),
                                    flush_cache=lambda: True)
    try:
        slots = alloc.alloc(100)
        wu.SchedulerWeightUpdaterManager.release_memory_occupation(
            updater, ReleaseMemoryOccupationReqInput(tags=["cuda_graph"]))
        assert not store.released and store.pool.arena.mapped_bytes >= store.pool.group_bytes
        alloc.free(slots)
    finally:
        kv._clear_buffers()


def test_release_keeps_the_pinned_group_while_slots_are_held():
    kv = new_kv(size=4 * 8192)
    alloc, store = new_allocator(kv), kv.kvcached_store
    try:
        held = alloc.alloc(10)  # a flush that could not free everything
        assert store.release() == store.pool.group_bytes
        alloc.free(held)
        assert store.release() == 0  # once they are back, the group goes too
        store.pool.set_limit_bytes(3 * store.pool.group_bytes)  # kvctl limit while released
        store.resume()
        assert store.pool.arena.mapped_bytes == store.pool.group_bytes
        assert store.pool.limit_bytes == 3 * store.pool.group_bytes  # it stands
    finally:
        kv._clear_buffers()


def test_profiling_reports_free_device_memory_not_a_fraction():
    from kvcached import vmm
    from kvcached.integrations.sglang.patches import profile_available_bytes

    free_bytes, total_bytes = vmm.make_backend("host").mem_info()
    assert profile_available_bytes("cpu") == free_bytes
    assert 0 < free_bytes <= total_bytes


# -- the radix cache ---------------------------------------------------------------------


def new_tree(alloc, page_size: int = 1):
    from sglang.srt.mem_cache.cache_init_params import CacheInitParams
    from sglang.srt.mem_cache.radix_cache import RadixCache

    return RadixCache(CacheInitParams(disable=False, req_to_token_pool=None, token_to_kv_pool_allocator=alloc,
                                      page_size=page_size))


def insert(tree, alloc, tokens: list[int]):
    from sglang.srt.mem_cache.base_prefix_cache import InsertParams
    from sglang.srt.mem_cache.radix_cache import RadixKey

    slots = alloc.alloc(len(tokens))
    tree.insert(InsertParams(key=RadixKey(tokens), value=slots))
    return slots


def test_radix_cache_eviction_frees_pages_to_the_pool():
    from sglang.srt.mem_cache.base_prefix_cache import EvictParams

    kv = new_kv(size=4 * 8192)
    alloc, pool = new_allocator(kv), kv.kvcached_store.pool
    try:
        tree = new_tree(alloc)
        for i in range(8):
            insert(tree, alloc, [1000 * i + j for j in range(2000)])
        assert tree.evictable_size() == 16000 and alloc.num_pages_in_use == 16000
        tree.evict(EvictParams(num_tokens=16000))
        assert tree.evictable_size() == 0 and alloc.num_pages_in_use == 0
        assert wait_for(lambda: pool.stats().mapped_bytes == pool.group_bytes)
    finally:
        kv._clear_buffers()


def test_radix_cache_is_bounded_in_bytes(monkeypatch):
    kv = new_kv(size=4 * 8192)
    alloc, pool = new_allocator(kv), kv.kvcached_store.pool
    try:
        slot_bytes = pool.block_bytes
        monkeypatch.setenv("KVCACHED_PREFIX_CACHE_MAX", str(3000 * slot_bytes))
        tree = new_tree(alloc)
        for i in range(4):
            insert(tree, alloc, [10_000 * i + j for j in range(1000)])
        assert tree.evictable_size() <= 3000
        assert alloc.num_pages_in_use == tree.evictable_size()  # the evicted slots went back
    finally:
        kv._clear_buffers()


def test_on_a_shared_budget_the_radix_cache_keeps_the_idle_cache_bound(monkeypatch):
    from kvcached.control import Controller

    shm = f"kvcached-test-sglang-budget-{os.getpid()}"
    monkeypatch.setenv("KVCACHED_SHM_NAME", shm)
    monkeypatch.setenv("KVCACHED_ENGINE_NAME", "shared-llama")
    monkeypatch.delenv("KVCACHED_PREFIX_CACHE_MAX", raising=False)  # no bound of its own
    kv = new_kv(size=4 * 8192)
    try:
        alloc, pool = new_allocator(kv), kv.kvcached_store.pool
        monkeypatch.setenv("KVCACHED_IDLE_CACHE_MAX", str(2000 * pool.block_bytes))
        tree = new_tree(alloc)
        for i in range(4):
            insert(tree, alloc, [10_000 * i + j for j in range(1000)])
        assert tree.evictable_size() == 4000  # alone on the GPU: the cache may use memory
        with Controller.open(shm) as ctl:
            ctl.set_budget(0, 1 << 40)  # now engines share a budget
        insert(tree, alloc, [50_000 + j for j in range(1000)])
        assert tree.evictable_size() <= 2000
        assert alloc.num_pages_in_use == tree.evictable_size()  # the evicted slots went back
    finally:
        kv._clear_buffers()
        Controller.unlink(shm)


def test_registers_in_the_control_plane(monkeypatch):
    from kvcached.control import Controller

    shm = f"kvcached-test-sglang-{os.getpid()}"
    monkeypatch.setenv("KVCACHED_SHM_NAME", shm)
    monkeypatch.setenv("KVCACHED_ENGINE_NAME", "tiny-llama")
    kv = new_kv()
    try:
        alloc = new_allocator(kv)
        alloc.alloc(5000)
        with Controller.open(shm) as ctl:
            assert wait_for(lambda: ctl.snapshot().engine("tiny-llama").used_bytes > 0)
            info = ctl.snapshot().engine("tiny-llama")
            assert info.kind.name == "SGLANG" and info.model == "tiny-llama"
    finally:
        kv._clear_buffers()
        Controller.unlink(shm)


def test_engine_name_is_the_served_model_name_by_default(monkeypatch):
    from kvcached.integrations.sglang.elastic import resolve_engine_name

    monkeypatch.delenv("KVCACHED_ENGINE_NAME", raising=False)
    argv = ["sglang.launch_server", "--model-path", "/models/llama", "--served-model-name", "llama-x"]
    monkeypatch.setattr(sys, "argv", argv)
    assert resolve_engine_name() == "llama-x"
    monkeypatch.setattr(sys, "argv", ["sglang.launch_server", "--model-path=/models/llama"])
    assert resolve_engine_name() == "models/llama"  # a valid name: "/models/llama" is refused at attach
    monkeypatch.setenv("KVCACHED_ENGINE_NAME", "chosen")  # kvctl launch --name
    assert resolve_engine_name() == "chosen"


def test_prefix_bound_evicts_page_aware(monkeypatch):
    """Two cached prefixes of equal size: the older shares its page group with a live
    request, the newer has a group of its own. LRU would evict the older and free no
    memory; the bound evicts the newer, so its group empties and is unmapped."""
    kv = new_kv(size=4 * 8192)
    alloc, pool = new_allocator(kv), kv.kvcached_store.pool
    try:
        tree = new_tree(alloc)
        live = alloc.alloc(8192 - 1 - 4000)  # group 0, with slot 0 pinned
        older = insert(tree, alloc, list(range(4000)))  # fills group 0
        newer = insert(tree, alloc, list(range(100_000, 104_000)))  # group 1, alone
        assert {int(s) // 8192 for s in older.tolist()} == {0} and {int(s) // 8192 for s in newer.tolist()} == {1}
        assert pool.arena.mapped_bytes == 2 * pool.group_bytes
        monkeypatch.setenv("KVCACHED_PREFIX_CACHE_MAX", str(4000 * pool.block_bytes))
        insert(tree, alloc, list(range(200_000, 200_001)))  # one more insert applies the bound
        assert tree.evictable_size() <= 4000
        assert alloc.num_pages_in_use == live.numel() + tree.evictable_size()
        assert torch.all(alloc._in_use[older]) and not torch.any(alloc._in_use[newer])  # the newer one went
        assert wait_for(lambda: pool.arena.mapped_bytes == pool.group_bytes)  # and its group with it
    finally:
        kv._clear_buffers()
