"""KVPool on the real host backend under random alloc/free/cache/reuse/evict/limit/trim
sequences: integrity after every step, accounting equal to the arena's and the backend's,
a physical cap that makes OOM real, and every live block's data intact through the views."""

from __future__ import annotations

import time

import pytest
import torch
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from poolkit import block_holds, host_backend, write_block

from kvcached.pool import KVLayout, KVPool, ReserveConfig

PAGE = 4096
NUM_PAGES = 12
CAP_PAGES = 6  # physical: half the virtual capacity


class PoolMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.pool: KVPool | None = None
        self.used: dict[int, float] = {}  # block -> value written
        self.cached: dict[int, float] = {}
        self.evicted: list[int] = []
        self.value = 1.0
        self.now = time.monotonic()

    @initialize(layout=st.sampled_from(list(KVLayout)), min_pages=st.integers(0, 2))
    def make(self, layout, min_pages):
        # 4 tokens x 2 heads x 32 dims x fp32 = 1 KiB per K or V block: 1 to 4 blocks per page.
        probe_group = {KVLayout.COMPOUND: 1, KVLayout.FLASHINFER: 2, KVLayout.MLA: 2}.get(layout, 4) * PAGE
        self.backend = host_backend(CAP_PAGES * probe_group, granularity=PAGE)
        self.pool = KVPool(
            2, layout, 4, 2, 32, torch.float32,
            backend=self.backend, virtual_bytes=NUM_PAGES * probe_group, page_bytes=PAGE,
            reserve=ReserveConfig(min_pages=min_pages, max_pages=3, trim_idle_s=1.0, lead_s=0.5),
            start_thread=False, on_evict=self.on_evict,
        )  # fmt: skip
        assert self.pool.arena.group_bytes == probe_group

    def on_evict(self, ids: list[int]) -> None:
        for b in ids:
            del self.cached[b]
        self.evicted += ids

    def teardown(self) -> None:
        if self.pool is not None:
            s = self.pool.stats()
            for what, happened in (
                ("denied", s.num_denied), ("mapped on the caller's thread", s.num_sync_maps),
                ("evicted", s.num_evicted), ("unmapped", s.num_pages_unmapped_total),
            ):  # fmt: skip
                event(f"{what}: {'yes' if happened else 'no'}")
            self.pool.close()
            assert self.backend.created_bytes == 0

    @rule(n=st.integers(1, 9))
    def alloc(self, n):
        before = self.pool.stats()
        ids = self.pool.alloc(n)
        if ids is None:
            after = self.pool.stats()
            assert after.num_denied == before.num_denied + 1 and after.demand_bytes > 0
            return
        assert len(ids) == n == len(set(ids)) and 0 not in ids
        assert not set(ids) & (set(self.used) | set(self.cached))
        for b in ids:
            self.value += 1
            write_block(self.pool, b, self.value)
            self.used[b] = self.value

    @precondition(lambda self: self.used)
    @rule(data=st.data(), cache=st.booleans())
    def release(self, data, cache):
        ids = data.draw(st.lists(st.sampled_from(sorted(self.used)), min_size=1, max_size=6, unique=True))
        if cache:
            self.pool.cache(ids)
            for b in ids:
                self.cached[b] = self.used[b]
        else:
            self.pool.free(ids)
        for b in ids:
            del self.used[b]

    @precondition(lambda self: self.cached)
    @rule(data=st.data(), drop=st.booleans())
    def hit_or_drop(self, data, drop):
        ids = data.draw(st.lists(st.sampled_from(sorted(self.cached)), min_size=1, max_size=4, unique=True))
        if drop:
            self.pool.free(ids)
        else:
            assert self.pool.reuse(ids) is True
            for b in ids:
                self.used[b] = self.cached[b]
        for b in ids:
            del self.cached[b]

    @precondition(lambda self: self.cached)
    @rule(n=st.integers(1, 5))
    def evict(self, n):
        count = len(self.cached)
        assert sorted(self.pool.evict(n)) == sorted(self.evicted[-min(n, count) :])
        assert len(self.cached) == max(0, count - n)

    @rule(groups=st.one_of(st.none(), st.integers(0, NUM_PAGES)))
    def limit(self, groups):
        group = self.pool.group_bytes
        met = self.pool.set_limit_bytes(None if groups is None else groups * group)
        s = self.pool.stats()
        assert met == s.limit_met == (groups is None or s.mapped_bytes <= groups * group)

    @rule(dt=st.sampled_from([0.0, 0.05, 0.5, 2.0]))
    def tick(self, dt):
        self.now += dt
        self.pool.maintain(self.now)

    @rule(data=st.data())
    def bad_free(self, data):
        live = set(self.used) | set(self.cached)
        bad = data.draw(st.sampled_from([b for b in range(-1, self.pool.num_blocks + 1) if b not in live]))
        before = self.pool.stats()
        with pytest.raises(ValueError):
            self.pool.free([*sorted(self.used)[:1], bad])
        assert self.pool.stats() == before

    @invariant()
    def consistent(self):
        if self.pool is None:
            return
        pool = self.pool
        pool.check_integrity()
        s = pool.stats()
        assert s.mapped_bytes == pool.arena.mapped_bytes == self.backend.created_bytes
        assert s.used_bytes == len(self.used) * s.block_bytes and s.cached_bytes == len(self.cached) * s.block_bytes
        assert s.mapped_bytes <= CAP_PAGES * s.group_bytes
        if s.limit_bytes is not None and s.limit_met:
            assert s.mapped_bytes <= max(s.limit_bytes, s.group_bytes)
        for b, value in (self.used | self.cached).items():
            assert block_holds(pool, b, value), f"block {b} lost its data"


TestPoolMachine = PoolMachine.TestCase
TestPoolMachine.settings = settings(max_examples=80, stateful_step_count=50, deadline=None)
