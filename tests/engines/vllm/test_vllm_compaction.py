"""Compaction against vLLM's real KVCacheManager, block pool, block table and block copy,
over KV tensors on a kvcached arena (CPU; the host backend stands in for the GPU).

A peak's leftovers hold a quarter of each of several page groups; one scheduler step
later their blocks sit on one group, the data followed them, the rows the worker reads
name the new blocks, prefix hits find the copies, and the emptied groups are unmapped.
"""

from __future__ import annotations

import os
import types

import pytest

vllm = pytest.importorskip("vllm", reason="vLLM is not installed here (see scripts/ci/setup_vllm_env.sh)")

from vllm_helpers import kv_cache_config  # noqa: E402

from kvcached.integrations import vllm as kv_vllm  # noqa: E402

pytestmark = pytest.mark.engine

MiB = 1 << 20
BLOCK = 16  # tokens per block


@pytest.fixture(scope="module", autouse=True)
def patched():
    os.environ.setdefault("KVCACHED_TRIM_IDLE_S", "0")
    kv_vllm.activate(vllm)


@pytest.fixture(params=["v1", "v2"])
def engine(request, monkeypatch):
    """A worker's KV tensors over an arena, and vLLM's KVCacheManager over the same pages;
    the rows rewritten in V1's or Model Runner V2's block table (0.34 has only V2)."""
    import importlib.util

    import torch
    import vllm.v1.worker.gpu.attn_utils as attn_utils
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.kv_cache_layout import KVCacheLayout

    from kvcached.integrations.vllm import runtime

    if request.param == "v1" and importlib.util.find_spec("vllm.v1.worker.block_table") is None:
        pytest.skip("this vLLM has no V1 model runner")
    if request.param == "v2":
        import vllm.v1.worker.gpu.buffer_utils as buffer_utils

        # MRV2 stages block-table writes in pinned (UVA) buffers, which need a GPU.
        monkeypatch.setattr(buffer_utils, "is_uva_available", lambda: False)
        monkeypatch.setattr(buffer_utils, "is_pin_memory_available", lambda: False, raising=False)
    monkeypatch.setenv("KVCACHED_PACK", "on")
    monkeypatch.setenv("KVCACHED_COMPACT", "on")
    monkeypatch.setattr(runtime, "_attach", lambda pages, kv: None)  # no control plane here
    config, layers = kv_cache_config(2048, 2, BLOCK)  # 8 page groups of 256 blocks
    num_blocks = config.num_blocks
    tensors = attn_utils.allocate_kv_cache(config, torch.device("cpu"), KVCacheLayout.LBNHC)
    worker = runtime.worker_kv()
    assert worker is not None and worker.num_blocks == num_blocks
    manager = KVCacheManager(config, max_model_len=1 << 15, scheduler_block_size=BLOCK, hash_block_size=BLOCK)
    assert manager.block_pool.kv is worker.pages
    yield Engine(manager=manager, pool=manager.block_pool, kv=worker.pages, worker=worker,
                 tensors=[tensors[name] for name in layers], config=config, runner_kind=request.param)
    worker.pages.close()


class Engine(types.SimpleNamespace):
    def __repr__(self) -> str:
        return "<engine>"  # printing its tensors would read unmapped pages (a fault, not a failure)


def request(manager, name: str, num_blocks: int):
    from vllm.sampling_params import SamplingParams
    from vllm.v1.request import Request

    r = Request(name, list(range(BLOCK * num_blocks)), SamplingParams(max_tokens=1 << 12), None)
    assert manager.allocate_slots(r, BLOCK * num_blocks) is not None
    r.num_computed_tokens = BLOCK * num_blocks
    return r


def scattered(engine):
    """Group 0 full, then four groups each left holding one quarter-group request."""
    manager, bpp = engine.manager, engine.kv.blocks_per_page
    quarter = bpp // 4
    request(manager, "first", bpp - 1)  # block 0 is the null block
    quarters = [request(manager, f"q{i}", quarter) for i in range(16)]
    keep = [quarters[i] for i in (0, 5, 10, 15)]  # one per group, each in a different slot
    for r in quarters:
        if r not in keep:
            manager.free(r)
    return keep


def groups_of(engine, r) -> set[int]:
    return {b // engine.kv.blocks_per_page for b in engine.manager.get_block_ids(r.request_id)[0]}


def fill(engine, block_id: int, value: float) -> None:
    for t in engine.tensors:
        t[block_id].fill_(value)


def read(engine, block_id: int) -> list[float]:
    return [float(t[block_id].float().mean()) for t in engine.tensors]


def step(engine):
    """What the scheduler patch does around a step; returns the step's output."""
    from vllm.v1.core.sched.output import SchedulerOutput

    from kvcached.integrations.vllm import compaction

    scheduler = types.SimpleNamespace(kv_cache_manager=engine.manager, connector=None)
    with engine.pool.kv_lock:
        moves = compaction.before_step(scheduler)
        output = SchedulerOutput.make_empty()
        if moves is not None:
            compaction.attach(output, moves)
    return output


def block_ids(engine, r) -> list[int]:
    return list(engine.manager.get_block_ids(r.request_id)[0])


def cache(pool, blocks) -> list:
    """Give ``blocks`` prefix-cache entries, as a request's full blocks get; their keys."""
    from vllm.v1.core.kv_cache_utils import make_block_hash_with_group_id

    keys = []
    for block in blocks:
        key = make_block_hash_with_group_id(block.block_id.to_bytes(32, "big"), 0)
        block.set_block_hash(key)
        pool.cached_block_hash_to_block.insert(key, block)
        keys.append(key)
    return keys


class Runner:
    """vLLM's model runner as the rewrite sees it, over its real block table: V1's cached
    request states and persistent batch, or Model Runner V2's request indices and
    ``BlockTables``."""

    def __init__(self, engine, reqs) -> None:
        import numpy as np
        import torch

        self.kind = engine.runner_kind
        index_of = {r.request_id: i for i, r in enumerate(reqs)}
        if self.kind == "v1":
            from vllm.v1.worker.block_table import MultiGroupBlockTable

            table = MultiGroupBlockTable(max_num_reqs=8, max_num_batched_tokens=1024, pin_memory=False,
                                         device=torch.device("cpu"), block_sizes=[BLOCK], max_num_blocks=[128])
            for i, r in enumerate(reqs):
                table.add_row((block_ids(engine, r),), i)
            self.ns = types.SimpleNamespace(
                requests={r.request_id: types.SimpleNamespace(block_ids=(block_ids(engine, r),)) for r in reqs},
                input_batch=types.SimpleNamespace(req_id_to_index=index_of, block_table=table),
            )
        else:
            from vllm.v1.worker.gpu.block_table import BlockTables

            tables = BlockTables(block_sizes=[BLOCK], max_num_reqs=8, max_num_batched_tokens=1024,
                                 max_num_blocks_per_group=[128], device=torch.device("cpu"))
            # A GPU kernel applies the staged writes; here each is also played on a copy.
            self.applied = np.zeros((8, 128), dtype=np.int64)
            staged = tables.block_tables[0]
            stage_write = staged.stage_write

            def play(index: int, start: int, ids) -> None:
                self.applied[index, start:start + len(ids)] = list(ids)
                stage_write(index, start, ids)

            staged.stage_write = play
            for i, r in enumerate(reqs):
                tables.append_block_ids(i, (block_ids(engine, r),), overwrite=False)
            self.ns = types.SimpleNamespace(req_states=types.SimpleNamespace(req_id_to_index=index_of),
                                            block_tables=tables)

    def rewrite(self, output):
        from kvcached.integrations.vllm import compaction

        return (compaction.rewrite_v1 if self.kind == "v1" else compaction.rewrite_v2)(self.ns, output)

    def rows(self, index: int, req_id: str) -> list[list[int]]:
        """What the worker would read for the request in row ``index``."""
        if self.kind == "v1":
            ids = list(self.ns.requests[req_id].block_ids[0])
            return [ids, list(self.ns.input_batch.block_table[0].block_table.np[index, :len(ids)])]
        length = int(self.ns.block_tables.num_blocks.np[0, index])
        return [list(self.applied[index, :length])]


def test_one_step_later_the_leftovers_share_one_group_with_their_data_rows_and_prefix_entries(engine, monkeypatch,
                                                                                              caplog):
    import time

    import vllm.utils.torch_utils as torch_utils
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.worker.utils import copy_kv_cache_blocks_inplace

    from kvcached.integrations.vllm import compaction
    from kvcached.integrations.vllm.states import FREE, USED

    monkeypatch.setattr(torch_utils, "PIN_MEMORY", False)  # vLLM stages the copy's indices in pinned memory (GPU only)
    e = engine
    kv, pool = e.kv, e.pool
    keep = scattered(e)
    homes = [groups_of(e, r) for r in keep]
    assert all(len(h) == 1 for h in homes) and len(set().union(*homes)) == 4  # four groups, a quarter each
    for k, r in enumerate(keep):
        for i, b in enumerate(block_ids(e, r)):
            fill(e, b, 100 * k + i)
    before = {r.request_id: block_ids(e, r) for r in keep}
    keys = cache(pool, [pool.blocks[b] for b in before["q15"]])
    runner = Runner(e, keep)
    mapped = kv.mapper.mapped_bytes

    assert step(e).kv_cache_block_copies is None  # the worker has not shown it rewrites rows yet
    runner.rewrite(SchedulerOutput.make_empty())  # its first step: it does
    with caplog.at_level("INFO", logger="kvcached.vllm"):
        output = step(e)
    assert "compaction moved 192 KV blocks" in caplog.text  # said once, at the first move
    moves = output.kvcached_moves
    assert {g for r in keep for g in groups_of(e, r)} == homes[0]  # the scheduler's lists
    assert sorted(src for src, _ in output.kv_cache_block_copies) == sorted(
        b for r in keep[1:] for b in before[r.request_id])
    assert block_ids(e, keep[0]) == before["q0"]  # the densest group's request stayed

    # The worker: rows rewritten, vLLM's own copy moves the bytes, then the copy is marked.
    runner.rewrite(output)
    copy_kv_cache_blocks_inplace(e.tensors, e.config.num_blocks, output.kv_cache_block_copies)
    compaction.copy_queued(moves)
    for index, (k, r) in enumerate(enumerate(keep)):
        ids = block_ids(e, r)
        views = runner.rows(index, r.request_id)
        assert views and all(view == ids for view in views)
        assert [read(e, b) for b in ids] == [[100.0 * k + i] * 2 for i in range(len(ids))]
    new_ids = block_ids(e, keep[3])
    assert [pool.cached_block_hash_to_block.get_one_block(key).block_id for key in keys] == new_ids

    # The sources stay held until the copy ran; the next step frees them, the trim unmaps.
    assert all(kv.block_state[src] == USED for src, _ in moves.pairs)
    step(e)
    assert all(kv.block_state[src] == FREE for src, _ in moves.pairs)
    kv.maintain(time.monotonic() + 10)
    assert kv.mapper.mapped_bytes <= mapped - 2 * kv.group_bytes
    assert [read(e, b) for b in new_ids] == [[300.0 + i] * 2 for i in range(len(new_ids))]
    kv.check_integrity()



def test_a_shared_block_pins_its_group_and_the_rest_joins_it(engine):
    from vllm.v1.core.sched.output import SchedulerOutput

    from kvcached.integrations.vllm import compaction

    e = engine
    keep = scattered(e)
    Runner(e, keep).rewrite(SchedulerOutput.make_empty())
    homes = [groups_of(e, r) for r in keep]
    shared = e.pool.blocks[block_ids(e, keep[3])[0]]
    e.pool.touch([shared])  # a prefix hit: two requests hold this block now
    output = step(e)
    assert groups_of(e, keep[3]) == homes[3]  # its group is pinned: nothing of it moves ...
    assert {g for r in keep[:3] for g in groups_of(e, r)} == homes[3]  # ... the others join it there
    assert len(output.kv_cache_block_copies) == 3 * len(block_ids(e, keep[1]))
    compaction.copy_queued(output.kvcached_moves)
    e.pool.compactor.last = 0.0
    assert step(e).kv_cache_block_copies is None  # all on one group: nothing more to gain
    e.kv.check_integrity()


def test_compaction_off_or_without_packing_moves_nothing(engine, monkeypatch):
    from vllm.v1.core.sched.output import SchedulerOutput


    e = engine
    keep = scattered(e)
    Runner(e, keep).rewrite(SchedulerOutput.make_empty())
    monkeypatch.setenv("KVCACHED_COMPACT", "off")
    assert step(e).kv_cache_block_copies is None
    monkeypatch.setenv("KVCACHED_COMPACT", "auto")
    monkeypatch.setattr(e.kv, "pack", "off")  # auto follows packing (vLLM's own order: no budget)
    assert step(e).kv_cache_block_copies is None
    e.kv.pack = "on"
    assert step(e).kv_cache_block_copies


def test_the_sources_stay_held_until_the_copys_event_has_passed(engine):
    from vllm.v1.core.sched.output import SchedulerOutput

    from kvcached.integrations.vllm.states import FREE, USED

    class Event:  # stands in for the CUDA event the worker records after the copy
        passed = False

        def query(self) -> bool:
            return self.passed

    e = engine
    keep = scattered(e)
    Runner(e, keep).rewrite(SchedulerOutput.make_empty())
    moves = step(e).kvcached_moves
    sources = [src for src, _ in moves.pairs]
    step(e)
    assert all(e.kv.block_state[b] == USED for b in sources)  # the worker has not queued the copy yet
    event = Event()
    moves.copied(event)
    step(e)
    assert all(e.kv.block_state[b] == USED for b in sources)  # queued, not yet run on the GPU
    event.passed = True
    step(e)
    assert all(e.kv.block_state[b] == FREE for b in sources)
    assert all(e.pool.blocks[b].ref_cnt == 0 for b in sources)
    e.kv.check_integrity()


def test_a_limit_below_the_groups_the_blocks_are_spread_over_is_met_before_they_end(engine, monkeypatch):
    from vllm.v1.core.sched.output import SchedulerOutput

    from kvcached.integrations.vllm import compaction

    e = engine
    kv, manager = e.kv, e.manager
    keep = scattered(e)
    manager.free(keep[1])
    manager.free(keep[2])  # two groups hold a quarter each: one group's worth, gain 1
    Runner(e, [keep[0], keep[3]]).rewrite(SchedulerOutput.make_empty())
    assert step(e).kv_cache_block_copies is None  # a gain of one group is not worth a move ...
    monkeypatch.setenv("KVCACHED_COMPACT", "auto")
    kv.pack = "off"  # ... and auto does not compact an engine that does not pack, unless:
    assert not kv.set_limit_bytes(2 * kv.group_bytes)  # group 0 and one more: the used blocks keep three
    e.pool.compactor.last = 0.0
    output = step(e)
    assert output.kv_cache_block_copies  # under the unmet limit one group is worth it
    assert groups_of(e, keep[0]) == groups_of(e, keep[3])
    compaction.copy_queued(output.kvcached_moves)
    step(e)  # the sources are freed, which wakes the limit's unmap
    kv.maintain()
    assert kv.limit_met and kv.mapper.mapped_bytes <= 2 * kv.group_bytes
    kv.check_integrity()
