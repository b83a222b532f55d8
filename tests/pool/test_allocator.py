"""BlockAllocator alone: pure bookkeeping, checked against a model after every step."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvcached.pool import BlockAllocator
from kvcached.pool.pages import MAPPED, UNMAPPED

BPP = 4


def mapped(num_pages: int = 4, bpp: int = BPP, map_pages: int | None = None, pinned: int = 1) -> BlockAllocator:
    a = BlockAllocator(num_pages, bpp, pinned)
    a.publish(a.claim_unmapped(num_pages if map_pages is None else map_pages))
    a.check_integrity()
    return a


def test_take_fills_the_fullest_page_first():
    a = mapped(num_pages=3, bpp=8)  # page 0: 7 free (block 0 pinned); pages 1, 2: 8 free
    first = a.take(3)
    assert {b // 8 for b in first} == {0}
    a.free([b for b in first][:2])  # page 0 back to 6 free
    a.take(8)  # page 0 is the fullest (6 free): emptied first, then 2 from an empty page
    a.check_integrity()
    assert a.num_free == 24 - 1 - 3 + 2 - 8
    assert a.num_empty_pages == 1


def test_pages_are_mapped_low_first_and_empty_pages_leave_oldest_first():
    a = BlockAllocator(6, BPP)
    assert a.claim_unmapped(2) == [0, 1]
    a.publish([0, 1])
    assert a.claim_unmapped(1) == [2]
    a.abandon([2])
    assert a.claim_unmapped(10) == [2, 3, 4, 5]
    a.publish([3, 5, 2, 4])
    a.check_integrity()
    assert a.claim_empty(2) == [1, 3]
    a.retire([1, 3])
    assert a.claim_unmapped(1) == [1]
    a.abandon([1])
    a.check_integrity()


def test_pinned_block_is_never_handed_out_and_page_zero_never_empties():
    a = mapped(num_pages=2, bpp=BPP)
    ids = a.take(7)
    assert 0 not in ids and sorted(ids) == list(range(1, 8))
    a.free(ids)
    assert a.claim_empty(5) == [1]  # page 0 keeps its pinned block: never empty
    with pytest.raises(ValueError, match=r"pinned null blocks \[0\]"):
        a.free([0])


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ([99], r"unknown ids \(valid: 0..15\) \[99\]"),
        ([-1], r"unknown ids .* \[-1\]"),
        (["3"], r"unknown ids .* \['3'\]"),
        (["dup"], r"repeated ids \[\d+\]"),
        ([9], r"not in use \(double free\?\) \[9\]"),
    ],
)
def test_bad_free_names_the_ids_and_changes_nothing(bad, match):
    a = mapped()
    a.take(4)
    used = sorted(b for b in range(16) if a.is_used(b))
    ok = used[0]
    before = (a.num_free, sorted(used), a.num_frees)
    with pytest.raises(ValueError, match=match):
        a.free([ok, *bad] if bad != ["dup"] else [ok, used[-1], used[-1]])
    assert (a.num_free, sorted(b for b in range(16) if a.is_used(b)), a.num_frees) == before
    a.check_integrity()


def test_double_free_and_freeing_a_cached_block_twice():
    a = mapped()
    ids = a.take(3)
    a.free(ids[:1])
    with pytest.raises(ValueError, match="double free"):
        a.free(ids[:1])
    a.cache(ids[1:])
    a.free(ids[1:2])  # dropping a cached block is a free
    with pytest.raises(ValueError, match="double free"):
        a.free(ids[1:2])
    with pytest.raises(ValueError, match="cached blocks, not in use"):
        a.cache(ids[2:])
    a.check_integrity()


def test_reuse_is_all_or_nothing():
    a = mapped()
    ids = a.take(3)
    a.cache(ids)
    a.evict(1)
    assert a.reuse(ids) is False and a.num_cached == 2
    kept = a.cached_blocks()
    assert a.reuse(kept) is True and a.num_cached == 0
    with pytest.raises(ValueError, match="repeated"):
        a.reuse([kept[0], kept[0]])
    with pytest.raises(ValueError, match="unknown"):
        a.reuse([1000])
    a.check_integrity()


def test_eviction_prefers_whole_pages_then_least_recently_cached():
    a = mapped(num_pages=4, bpp=BPP)  # 15 usable blocks
    ids = a.take(15)
    page = {p: [b for b in ids if b // BPP == p] for p in range(4)}
    a.cache(page[3][:2])  # page 3: 2 cached, 2 used
    a.cache(page[1])  # page 1: cached only (older)
    a.cache(page[2])  # page 2: cached only (newer)
    a.cache(page[3][2:])  # page 3 now cached only, most recent
    a.free(page[0])  # page 0: free but for the pinned block
    evicted = a.evict(5)
    assert sorted(evicted[:4]) == sorted(page[1]) and evicted[4] in page[2]
    assert a.num_empty_pages == 1
    a.check_integrity()
    assert sorted(a.evict_pages(1)) == sorted(set(page[2]) - set(evicted))
    assert a.num_empty_pages == 2


def test_eviction_of_blocks_next_to_used_ones_is_least_recent_first():
    a = mapped(num_pages=2, bpp=BPP)
    ids = sorted(a.take(7))
    a.cache([ids[1]])
    a.cache([ids[5], ids[2]])
    assert a.evict(2) == [ids[1], ids[5]]  # no cache-only page: plain LRU
    assert a.evict_pages(3) == []  # no page can be emptied by eviction


class AllocatorModel(RuleBasedStateMachine):
    """Random take/free/cache/reuse/evict/map/unmap against a set model."""

    def __init__(self) -> None:
        super().__init__()
        self.a = BlockAllocator(6, BPP, num_pinned_blocks=1)
        self.used: set[int] = set()
        self.cached: list[int] = []  # LRU order
        self.mapped: set[int] = set()

    def free_count(self) -> int:
        return len(self.mapped) * BPP - (1 if 0 in self.mapped else 0) - len(self.used) - len(self.cached)

    @rule(n=st.integers(1, 6))
    def map_pages(self, n):
        pages = self.a.claim_unmapped(n)
        assert all(self.a.page_state(p) != UNMAPPED for p in pages)
        self.a.publish(pages)
        self.mapped |= set(pages)

    @rule(n=st.integers(1, 6), fail=st.booleans())
    def unmap_empty(self, n, fail):
        pages = self.a.claim_empty(n)
        if fail:
            self.a.restore(pages)
        else:
            self.a.retire(pages)
            self.mapped -= set(pages)
            assert not {b // BPP for b in self.used | set(self.cached)} & set(pages)

    @rule(n=st.integers(1, 10))
    def take(self, n):
        if n > self.a.num_free:
            return
        fullest = min((c for c in self.partial_counts().values() if c), default=None)
        ids = self.a.take(n)
        assert len(ids) == n and not set(ids) & (self.used | set(self.cached)) and 0 not in ids
        assert {b // BPP for b in ids} <= self.mapped
        if fullest is not None and n < fullest:
            assert len({b // BPP for b in ids}) == 1 and self.partial_counts_before[ids[0] // BPP] == fullest
        self.used |= set(ids)

    def partial_counts(self) -> dict[int, int]:
        counts = {p: BPP - (p == 0) for p in self.mapped}
        for b in self.used | set(self.cached):
            counts[b // BPP] -= 1
        self.partial_counts_before = counts
        return {p: c for p, c in counts.items() if c < BPP}

    @precondition(lambda self: self.used)
    @rule(data=st.data())
    def free(self, data):
        ids = data.draw(st.lists(st.sampled_from(sorted(self.used)), min_size=1, max_size=5, unique=True))
        self.a.free(ids)
        self.used -= set(ids)

    @precondition(lambda self: self.used)
    @rule(data=st.data())
    def cache(self, data):
        ids = data.draw(st.lists(st.sampled_from(sorted(self.used)), min_size=1, max_size=5, unique=True))
        self.a.cache(ids)
        self.used -= set(ids)
        self.cached += ids

    @precondition(lambda self: self.cached)
    @rule(data=st.data())
    def reuse_or_drop(self, data):
        ids = data.draw(st.lists(st.sampled_from(self.cached), min_size=1, max_size=3, unique=True))
        if data.draw(st.booleans()):
            assert self.a.reuse(ids) is True
            self.used |= set(ids)
        else:
            self.a.free(ids)
        self.cached = [b for b in self.cached if b not in ids]

    @rule(n=st.integers(0, 6))
    def evict(self, n):
        evicted = self.a.evict(n)
        assert len(evicted) == min(n, len(self.cached)) and set(evicted) <= set(self.cached)
        self.cached = [b for b in self.cached if b not in evicted]

    @rule(data=st.data())
    def bad_free(self, data):
        candidates = sorted(set(range(-1, 6 * BPP + 1)) - self.used - set(self.cached))
        bad = data.draw(st.sampled_from(candidates))
        with pytest.raises(ValueError):
            self.a.free([bad])

    @invariant()
    def consistent(self):
        a = self.a
        a.check_integrity()
        assert a.num_used == len(self.used) and a.num_cached == len(self.cached)
        assert a.cached_blocks() == self.cached
        assert a.num_free == self.free_count()
        assert {p for p in range(6) if a.page_state(p) == MAPPED} == self.mapped


TestAllocatorModel = AllocatorModel.TestCase
TestAllocatorModel.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_the_current_page_yields_to_a_fuller_one():
    a = mapped(num_pages=3, bpp=8)
    first = a.take(7)  # page 0 full (its 7 free blocks)
    second = a.take(6)  # 6 of an empty page: it is current, 2 left
    third = a.take(5)  # 2 from the current page, 3 from the last one (current now, 5 left)
    pages = {b // 8 for b in second}
    (p_second,) = pages
    a.free([b for b in third if b // 8 != p_second])  # the last page is empty and current again
    a.free(first[:2])  # page 0: 2 free, the fullest
    a.check_integrity()
    got = a.take(2)
    assert {b // 8 for b in got} == {0}, "took from the emptier current page, not the fullest"
    a.check_integrity()
