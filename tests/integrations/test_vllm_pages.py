"""VllmPages: the page bookkeeping behind the vLLM block pool, on the host backend.

vLLM-free: the block pool's side is played by plain calls with the block states vLLM
would produce. The end-to-end tests against vLLM's real BlockPool live in
tests/engines/vllm/.
"""

from __future__ import annotations

import pytest

from kvcached import _vmm
from kvcached.integrations.vllm import placement
from kvcached.integrations.vllm.pages import CACHED, FREE, USED, VllmPages

PAGE = 64 << 10
BPP = 16


@pytest.fixture
def make():
    made = []

    def make_pages(num_blocks=16 * BPP, evicted=None, **kwargs):
        backend = _vmm.HostBackend(64 << 20, PAGE)
        arena = _vmm.Arena(backend, 2, (num_blocks // BPP) * PAGE, PAGE)
        calls = evicted if evicted is not None else []

        def evict(ids):
            calls.append(list(ids))
            pages.set_states(ids, FREE)

        pages = VllmPages(arena, num_blocks=num_blocks, blocks_per_page=BPP, block_bytes=2 * PAGE // BPP,
                          evict_cached=evict, start_thread=False, **kwargs)
        made.append(pages)
        return pages, arena

    yield make_pages
    for pages in made:
        pages.close()


def test_only_page_zero_is_mapped_at_start(make):
    pages, arena = make()
    assert arena.mapped_pages() == [0]
    assert pages.stats().mapped_bytes == arena.mapped_bytes == 2 * PAGE
    pages.check_integrity()


def test_blocks_map_their_pages_and_empty_pages_are_trimmed_after_idle(make):
    pages, arena = make(trim_idle_s=0.0, reserve_pages=0)
    ids = list(range(20, 60))  # pages 1..3
    assert pages.pages_of(ids) == [1, 2, 3]
    assert pages.ensure_mapped(pages.pages_of(ids))
    pages.set_states(ids, USED)
    assert arena.mapped_pages() == [0, 1, 2, 3]
    pages.check_integrity()
    pages.set_states(ids[:20], CACHED)  # cached blocks keep their pages
    pages.set_states(ids[20:], FREE)
    pages.maintain()
    assert arena.mapped_pages() == [0, 1, 2]  # page 3 held only free blocks
    pages.set_states(ids[:20], FREE)
    pages.maintain()
    assert arena.mapped_pages() == [0]
    assert pages.stats().mapped_bytes == arena.mapped_bytes
    pages.check_integrity()


def test_reserve_keeps_one_empty_page_after_idle(make):
    pages, arena = make(trim_idle_s=0.0, reserve_pages=1)
    ids = list(range(16, 64))
    pages.ensure_mapped(pages.pages_of(ids))
    pages.set_states(ids, USED)
    pages.set_states(ids, FREE)
    pages.maintain()
    assert len(arena.mapped_pages()) == 2  # page 0 and one empty page kept ahead


def test_limit_caps_mapping_and_lowering_it_evicts_cached_pages(make):
    evicted: list[list[int]] = []
    pages, arena = make(evicted=evicted)
    ids = list(range(16, 80))  # pages 1..4
    pages.ensure_mapped(pages.pages_of(ids))
    pages.set_states(ids, USED)
    pages.set_states(range(16, 48), CACHED)  # pages 1-2 hold only cached blocks
    assert not pages.set_limit_bytes(2 * 2 * PAGE + 1)  # 2 page groups: live blocks keep 3 mapped
    assert evicted and sorted(b for call in evicted for b in call) == list(range(16, 48))
    assert arena.mapped_pages() == [0, 3, 4]
    assert pages.room_pages() == 0 and (pages.usable_blocks() - pages.num_blocks_on_mapped_pages()) == 0
    assert not pages.ensure_mapped([5])  # refused: over the limit
    assert pages.stats().num_denied == 1 and pages.stats().demand_bytes == 2 * PAGE
    pages.set_states(range(48, 80), FREE)
    assert pages.set_limit_bytes(pages.limit_bytes)
    assert len(arena.mapped_pages()) <= 2  # within the limit; an empty page may stay as reserve
    pages.check_integrity()


def test_blocks_freed_under_an_unmet_limit_go_back_in_the_next_round_not_on_the_callers_path(make):
    pages, arena = make()
    ids = list(range(16, 80))  # pages 1..4, all used
    pages.ensure_mapped(pages.pages_of(ids))
    pages.set_states(ids, USED)
    assert not pages.set_limit_bytes(2 * 2 * PAGE)  # two groups; the used blocks keep five mapped
    with pages.lock:  # as the block pool frees, with the scheduler holding the lock
        pages.set_states(range(32, 80), FREE)
        pages.enforce_soon()
        assert arena.mapped_pages() == [0, 1, 2, 3, 4]  # nothing unmapped on this path
    pages.maintain()
    assert pages.limit_met and arena.mapped_pages() == [0, 1]
    pages.check_integrity()


def test_negative_limit_changes_nothing(make):
    pages, _ = make()
    with pytest.raises(ValueError, match="limit_bytes must be an integer >= 0"):
        pages.set_limit_bytes(-1)
    assert pages.limit_bytes is None and pages.limit_met


def test_suspend_gives_back_everything_and_resume_maps_page_zero(make):
    evicted: list[list[int]] = []
    pages, arena = make(evicted=evicted)
    pages.ensure_mapped([1])
    pages.set_states(range(16, 20), USED)
    with pytest.raises(RuntimeError, match="4 blocks are in use"):
        pages.suspend()
    pages.set_states(range(16, 20), CACHED)
    pages.suspend()
    assert arena.mapped_bytes == 0 and evicted == [[16, 17, 18, 19]]
    assert not pages.ensure_mapped([2])
    pages.resume()
    assert arena.mapped_pages() == [0]
    pages.check_integrity()


def test_prefetch_maps_pages_ahead_from_the_thread_side(make):
    pages, arena = make(reserve_pages=2)
    pages.want_prefetch(range(32, 112))
    pages.maintain()
    assert arena.mapped_pages() == [0, 2, 3, 4]  # the next block's page and two after it
    pages.check_integrity()


def test_idle_engine_shrinks_its_prefix_cache_to_the_bound(make):
    evicted: list[list[int]] = []
    pages, arena = make(evicted=evicted, trim_idle_s=0.0, reserve_pages=0, idle_cache_bytes=2 * PAGE)
    ids = list(range(16, 80))  # pages 1..4, all cached after their requests ended
    pages.ensure_mapped(pages.pages_of(ids))
    pages.set_states(ids, USED)
    pages.set_states(range(64, 66), USED)  # page 4 keeps a used block
    pages.set_states([b for b in ids if b not in (64, 65)], CACHED)
    pages.maintain()
    kept = pages.stats().cached_bytes
    assert kept <= 2 * PAGE + pages.blocks_per_page * pages.block_bytes
    assert 4 in [p for p in arena.mapped_pages()]  # the page with a used block stays
    assert len(arena.mapped_pages()) < 5
    pages.check_integrity()


def test_pressure_from_another_engine_gives_back_cache_only_pages(make):
    pages, arena = make()
    ids = list(range(16, 48))
    pages.ensure_mapped(pages.pages_of(ids))
    pages.set_states(ids, USED)
    pages.set_states(ids, CACHED)
    assert pages.trim_reserve() == 2
    assert arena.mapped_pages() == [0]
    pages.check_integrity()


def test_budget_room_caps_capacity_and_asks_the_others_for_memory(make):
    import time

    room = {"bytes": 3 * 2 * PAGE}
    pages, arena = make(budget_room=lambda: room["bytes"])
    assert pages.room_pages() == 3
    assert (pages.usable_blocks() - pages.num_blocks_on_mapped_pages()) == 3 * BPP
    assert pages.stats().num_denied == 0  # asking is not being refused
    pages.note_refused()  # vLLM could not place a request: the budget, not the limit, is why
    assert pages.stats().num_denied == 1
    pages.note_refused()
    assert pages.stats().num_denied == 1  # at most one note per 20 ms
    pages.set_limit_bytes(2 * 2 * PAGE)  # now the limit binds first: not the budget's doing
    time.sleep(0.03)
    pages.note_refused()
    assert pages.stats().num_denied == 1
    pages.set_limit_bytes(None)
    room["bytes"] = 2 * PAGE - 1  # less than one page group
    assert pages.room_pages() == 0
    assert not pages.ensure_mapped([1])
    assert arena.mapped_pages() == [0]
    room["bytes"] = None  # no budget: the limit alone decides
    assert pages.room_pages() == pages.num_pages - 1


def test_cold_cache_beyond_the_bound_goes_while_the_engine_is_busy(make):
    import time

    evicted: list[list[int]] = []
    pages, arena = make(evicted=evicted, trim_idle_s=0.2, reserve_pages=0, idle_cache_bytes=0)
    pages.ensure_mapped([1, 2, 3])
    pages.set_states(range(16, 64), USED)
    pages.set_states(range(16, 32), CACHED)  # page 1: cache only, from now on
    t_cold = time.monotonic()
    pages.set_states(range(32, 48), CACHED)  # page 2: cache only too
    pages.set_states(range(33, 34), USED)  # ... until a prefix hit takes a block again
    pages.set_states(range(48, 64), USED)  # page 3 keeps serving: the engine is busy
    pages.maintain(now=t_cold + 0.05)
    assert evicted == []  # not cold long enough (COLD_GRACE_S)
    pages.maintain(now=t_cold + 0.3)
    assert sorted(b for call in evicted for b in call) == list(range(16, 32))
    assert arena.mapped_pages() == [0, 2, 3]  # page 1 went back at once
    pages.check_integrity()


def test_blocks_on_mapped_pages_are_found_free_first(make):
    pages, _ = make()
    pages.ensure_mapped([1, 2])
    pages.set_states(range(1, 48), USED)  # pages 0-2 full
    pages.set_states(range(16, 20), CACHED)
    pages.set_states(range(40, 44), FREE)
    assert placement.free_blocks_on_mapped_pages(pages, 6) == [40, 41, 42, 43, 16, 17]
    assert placement.free_blocks_on_mapped_pages(pages, 100) == [40, 41, 42, 43, 16, 17, 18, 19]


def test_over_its_share_an_engine_admits_no_new_requests(make):
    pages, _ = make()
    assert pages.admits_new()
    pages.ensure_mapped([1, 2])
    pages.set_states(range(16, 40), USED)  # 24 blocks in use
    block = pages.block_bytes
    pages.set_share_bytes(30 * block)
    assert pages.admits_new()
    pages.set_share_bytes(24 * block)  # at its share: new requests wait, running ones go on
    assert not pages.admits_new()
    pages.set_states(range(30, 40), FREE)
    assert pages.admits_new()
    pages.set_share_bytes(0)
    assert not pages.admits_new()
    pages.set_share_bytes(None)  # contention over
    assert pages.admits_new()


def test_the_cold_cache_bound_counts_the_pages_it_pins_not_its_blocks(make):
    import time

    evicted: list[list[int]] = []
    pages, arena = make(evicted=evicted, trim_idle_s=0.0, reserve_pages=0, idle_cache_bytes=2 * (2 * PAGE))
    pages.ensure_mapped([1, 2, 3, 4, 5])
    pages.set_states(range(16, 96), USED)
    pages.set_states([b for b in range(16, 96) if b % 16], FREE)  # one block per page stays ...
    pages.set_states(range(16, 96, 16), CACHED)  # ... cached: 5 cached blocks pin 5 page groups
    assert pages.stats().cached_bytes == 5 * pages.block_bytes  # far below the 2-group bound
    pages.maintain(now=time.monotonic() + 1)
    assert len(arena.mapped_pages()) == 1 + 2  # page 0 and the two most recently cold pages
    assert sorted(b for call in evicted for b in call) == [16, 32, 48]  # the longest cold went first
    pages.check_integrity()


def test_idle_trim_keeps_the_page_the_next_request_will_use(make):
    pages, arena = make(trim_idle_s=0.0, reserve_pages=1)
    pages.ensure_mapped([1, 2, 3])
    pages.set_states(range(16, 64), USED)
    pages.set_states(range(16, 64), FREE)  # pages 1-3 empty; vLLM will hand out page 3's blocks next
    pages.want_prefetch(range(48, 80))
    pages.maintain()
    assert arena.mapped_pages() == [0, 3]  # the lowest empty page would have been kept before
    pages.want_prefetch(range(80, 96))  # page 5 is next and unmapped: the thread maps it ahead
    pages.maintain()
    pages.maintain()
    assert arena.mapped_pages() == [0, 5]
    pages.check_integrity()


def test_packing_follows_the_budget_and_hands_out_surplus_cache_first(make):
    room: dict[str, int | None] = {"bytes": None}
    pages, _ = make(budget_room=lambda: room["bytes"], idle_cache_bytes=2 * (2 * PAGE // BPP))  # 2 blocks
    assert not placement.packs(pages)  # no budget: vLLM's own order
    room["bytes"] = 1 << 30
    assert placement.packs(pages)  # engines share a budget: fill mapped pages first
    pages.ensure_mapped([1, 2, 3])  # page 3 stays empty: the reserve
    pages.set_states(range(1, 48), USED)
    pages.set_states(range(20, 26), CACHED)  # 6 cached blocks, 4 beyond the 2-block bound
    pages.set_states([33, 34], FREE)
    assert placement.blocks_to_pack(pages, 100) == [33, 34, 20, 21, 22, 23, *range(48, 64)]
    assert placement.blocks_to_pack(pages, 4) == [33, 34, 20, 21]
    assert placement.blocks_to_pack(pages, 100, include_empty=False) == [33, 34, 20, 21, 22, 23]
    assert placement.opens_page(pages, [48]) and placement.opens_page(pages, [64]) and not placement.opens_page(pages, [33])
    pages.set_states(range(20, 26), USED)
    pages.set_states([33, 34], USED)
    pages.set_states(range(48, 64), USED)
    assert placement.blocks_to_pack(pages, 100) == []  # nothing to reuse: a new page group it is
    for mode, expected in (("on", True), ("off", False)):
        forced, _ = make(pack=mode)
        assert placement.packs(forced) is expected
    with pytest.raises(ValueError, match="pack must be"):
        make(pack="sometimes")


def test_a_request_gets_blocks_next_to_its_own_else_on_the_lowest_group_with_room(make):
    pages, _ = make(idle_cache_bytes=2 * (2 * PAGE // BPP))  # keeps 2 cached blocks
    pages.ensure_mapped([1, 2, 3, 4])  # page 4 stays empty: the reserve
    pages.set_states(range(1, 64), USED)  # pages 0-3 full
    pages.set_states([3, 5], FREE)  # page 0: two holes
    pages.set_states([20, 21, 22, 23, 24], FREE)  # page 1: five
    pages.set_states([40, 41], FREE)  # page 2: two free and three cached (one beyond the bound)
    pages.set_states([42, 43, 44], CACHED)
    assert placement.blocks_near(pages, 1, near=45) == [40]  # next to the request's last block
    assert placement.blocks_near(pages, 4, near=45) == [40, 41, 42, 3]  # then a spare cached one, then the lowest room
    assert placement.blocks_near(pages, 4, near=None) == [20, 21, 22, 23]  # page 1 fits all four
    assert placement.blocks_near(pages, 9, near=None) == [20, 21, 22, 23, 24, 40, 41, 42, 3]  # roomiest first
    assert placement.blocks_near(pages, 100, near=None) == [20, 21, 22, 23, 24, 40, 41, 42, 3, 5]  # never page 4
    pages.set_states([3, 5, 20, 21, 22, 23, 24, 40, 41], USED)
    pages.set_states([42, 43, 44], USED)
    assert placement.blocks_near(pages, 1, near=45) == []  # full groups: vLLM's queue decides
    pages.check_integrity()


def test_packing_keeps_cached_blocks_a_prefix_hit_reused(make):
    pages, _ = make(idle_cache_bytes=0, pack="on")  # every cached block is beyond the bound
    pages.ensure_mapped([1, 2])
    pages.set_states(range(1, 48), USED)
    pages.set_states(range(20, 28), CACHED)
    for b in (20, 21, 22, 23):
        pages.reused[b] = 1  # a shared prefix: a later request hit these
    assert placement.blocks_to_pack(pages, 100) == [24, 25, 26, 27]
    assert placement.blocks_near(pages, 8, near=30) == [24, 25, 26, 27]
    assert placement.free_blocks_on_mapped_pages(pages, 100) == list(range(20, 28))  # budget full: any will do
    pages.check_integrity()


def test_usable_blocks_counts_mapped_room_under_the_limit_and_the_budget(make):
    room = {"bytes": None}
    pages, arena = make(budget_room=lambda: room["bytes"])
    everything = pages.num_blocks - 1  # all but the null block
    assert pages.usable_blocks() == everything
    pages.ensure_mapped([1, 2])
    pages.set_states(range(16, 40), USED)
    assert arena.mapped_pages() == [0, 1, 2]
    assert pages.usable_blocks() == everything - 24
    pages.set_limit_bytes(4 * 2 * PAGE)  # four groups: three mapped, one more may be
    assert pages.usable_blocks() == 4 * BPP - 1 - 24
    room["bytes"] = 0  # the GPU budget is full: only what is mapped
    assert pages.usable_blocks() == 3 * BPP - 1 - 24 == pages.num_blocks_on_mapped_pages()
    pages.set_limit_bytes(2 * PAGE)  # below what is mapped: nothing new, nothing negative
    assert pages.usable_blocks() == pages.num_blocks_on_mapped_pages()


def test_the_prefetch_looks_further_ahead_while_the_scheduler_maps_pages_itself(make):
    pages, arena = make(reserve_pages=1)
    pages.want_prefetch(range(16, 16 * BPP))
    assert pages.ahead_mapped()  # asked and pending: the scheduler need not ask again
    pages.maintain()
    assert arena.mapped_pages() == [0, 1, 2]  # the base depth: the next page and one more
    assert pages.ensure_mapped([3])  # the burst outran the thread: a map on the scheduler's side
    assert not pages.ahead_mapped()  # the depth doubled: the scheduler asks again
    pages.want_prefetch(range(4 * BPP, 16 * BPP))
    pages.maintain()
    assert arena.mapped_pages() == [0, 1, 2, 3, 4, 5, 6, 7]  # four pages ahead of page 3
    assert pages.ensure_mapped([8]) and pages.ensure_mapped([9])
    assert pages._ahead.want == pages._ahead.max == 16  # capped (16 groups, well under 1 GiB here)
    # Without a map on the scheduler's side the depth halves back, one step per decay period.
    later = pages._ahead.raised + 0.6
    pages.maintain(now=later)
    assert pages._ahead.want == 8
    pages.maintain(now=later + 0.6)
    pages.maintain(now=later + 1.2)
    pages.maintain(now=later + 1.8)
    assert pages._ahead.want == 2
    pages.check_integrity()


@pytest.mark.parametrize("give_back", ["idle trim", "a peer's pressure", "a lowered limit"])
def test_giving_pages_back_unmaps_outside_the_lock_and_hides_the_pages_meanwhile(make, give_back):
    import threading

    pages, arena = make(trim_idle_s=0.0, reserve_pages=0)

    class SlowUnmap:
        """The arena, with an unmap that waits until the test lets it go."""

        def __init__(self) -> None:
            self.entered, self.release = threading.Event(), threading.Event()

        def __getattr__(self, name):
            return getattr(arena, name)

        def unmap(self, page_ids):
            self.entered.set()
            assert self.release.wait(5)
            arena.unmap(page_ids)

    pages.ensure_mapped([1, 2])
    pages.set_states(range(16, 48), USED)
    pages.set_states(range(16, 48), FREE)  # pages 1 and 2 empty
    pages.mapper = slow = SlowUnmap()
    action = {
        "idle trim": pages.maintain,
        "a peer's pressure": pages.trim_reserve,
        "a lowered limit": lambda: pages.set_limit_bytes(pages.group_bytes),  # page group 0 only
    }[give_back]
    trim = threading.Thread(target=action)
    trim.start()
    assert slow.entered.wait(5)
    # The driver call is in progress; the scheduler's side still gets the lock at once,
    # finds no block to hand out on those pages, and the integrity recount holds.
    assert pages.lock.acquire(timeout=1)
    try:
        assert placement.free_blocks_on_mapped_pages(pages, 100) == list(range(1, 16))
        assert placement.opens_page(pages, [16])
        pages.check_integrity()
    finally:
        pages.lock.release()
    slow.release.set()
    trim.join(5)
    assert arena.mapped_pages() == [0]
    assert pages.stats().num_pages_unmapped_total == 2
    assert pages.limit_met
    pages.check_integrity()
    pages.set_limit_bytes(None)
    assert pages.ensure_mapped([1])  # and the page can be mapped again
    assert arena.mapped_pages() == [0, 1]


def test_a_failed_trim_leaves_the_pages_mapped_and_the_counts_right(make):
    pages, arena = make(trim_idle_s=0.0, reserve_pages=0)

    class FailingUnmap:
        def __getattr__(self, name):
            return getattr(arena, name)

        def unmap(self, page_ids):
            raise RuntimeError("driver error")

    pages.ensure_mapped([1])
    pages.set_states(range(16, 32), USED)
    pages.set_states(range(16, 32), FREE)
    pages.mapper = FailingUnmap()
    with pytest.raises(RuntimeError, match="driver error"):
        pages.maintain()
    assert arena.mapped_pages() == [0, 1]
    assert placement.free_blocks_on_mapped_pages(pages, 100)[-1] == 31  # page 1's blocks usable again
    pages.check_integrity()
    pages.mapper = arena
    pages.maintain()
    assert arena.mapped_pages() == [0]
    pages.check_integrity()


def test_compaction_plans_the_sparsest_whole_groups_into_the_densest(make):
    from kvcached.integrations.vllm import compaction

    pages, _ = make()

    def block(page, slot):
        return page * BPP + slot

    pages.ensure_mapped([1, 2, 3, 4])
    pages.set_states([block(1, s) for s in range(12)], USED)
    pages.set_states([block(1, 12), block(1, 13)], CACHED)
    pages.reused[block(1, 13)] = 1  # a prefix hit reused it: not a destination
    pages.set_states([block(2, 0), block(2, 1)], USED)
    pages.set_states([block(3, s) for s in range(3)], USED)
    pages.set_states([block(4, 5)], USED)
    movable = lambda b: b != block(2, 0)  # noqa: E731 - one block of group 2 is shared

    # Group 4 (1 used) and group 3 (3 used) go; group 2 is pinned by its shared block. Into
    # group 1 first (free slots, then the cached one no hit reused), then group 2.
    assert compaction.plan(pages, movable) == [
        (block(4, 5), block(1, 14)), (block(3, 0), block(1, 15)), (block(3, 1), block(1, 12)),
        (block(3, 2), block(2, 2)),
    ]
    assert compaction.plan(pages, movable, max_moves=3) == [(block(4, 5), block(1, 14))]
    pages.set_states([block(3, s) for s in range(3)] + [block(4, 5)], FREE)
    assert compaction.plan(pages, lambda b: True) == []  # 14 blocks on 2 groups: gain 1 < 2
    pages.check_integrity()
