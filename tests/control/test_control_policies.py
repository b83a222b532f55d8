"""Rebalance policies: properties over random snapshots, and worked examples."""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcached.control import EngineInfo, EngineKind, EngineState, GpuInfo, Snapshot
from kvcached.control.policies import POLICIES, capped_fill

GiB = 1 << 30


def _engine(
    name: str,
    gpu: str = "GPU-0",
    demand: int = 0,
    min_bytes: int = 0,
    weight: float = 1.0,
    state: EngineState = EngineState.RUNNING,
    limit: int | None = None,
) -> EngineInfo:
    return EngineInfo(
        slot=0,
        name=name,
        model="m",
        kind=EngineKind.OTHER,
        state=state,
        pid=1,
        gpu_index=0,
        gpu_uuid=gpu,
        page_bytes=2 << 20,
        reserved_bytes=0,
        mapped_bytes=0,
        used_bytes=0,
        cached_bytes=0,
        reserve_bytes=0,
        demand_bytes=demand,
        limit_bytes=limit,
        limit_revision=1,
        applied_revision=1,
        applied_limit_bytes=limit,
        limit_met=True,
        watch_error=False,
        at_share=False,
        weight=weight,
        min_bytes=min_bytes,
        num_allocs=0,
        num_denied=0,
        num_maps=0,
        num_unmaps=0,
        num_sync_maps=0,
        heartbeat_age_s=0.0,
        started_ns=0,
    )


def _snapshot(engines: list[EngineInfo], capacities: dict[str, int]) -> Snapshot:
    gpus = [
        GpuInfo(i, uuid, total_bytes=cap, budget_bytes=cap, mapped_bytes=0, headroom_bytes=0, num_engines=0)
        for i, (uuid, cap) in enumerate(capacities.items())
    ]
    return Snapshot(gpus=gpus, engines=engines, taken_ns=0, generation=0)


sizes = st.integers(min_value=0, max_value=200 * GiB)
engine_rows = st.lists(
    st.tuples(
        st.sampled_from(["GPU-0", "GPU-1"]),
        sizes,  # demand
        st.integers(min_value=0, max_value=30 * GiB),  # min
        st.floats(min_value=0.01, max_value=100, allow_nan=False),  # weight
        st.sampled_from([EngineState.RUNNING, EngineState.SLEEPING, EngineState.STARTING]),
    ),
    max_size=12,
)


@settings(max_examples=150, deadline=None)
@given(rows=engine_rows, cap0=sizes, cap1=sizes, policy=st.sampled_from(sorted(POLICIES)))
def test_policy_properties(rows: list, cap0: int, cap1: int, policy: str) -> None:
    engines = [_engine(f"e{i}", gpu, demand, mn, w, state) for i, (gpu, demand, mn, w, state) in enumerate(rows)]
    capacities = {"GPU-0": cap0, "GPU-1": cap1}
    limits = POLICIES[policy](_snapshot(engines, capacities))
    assert set(limits) == {e.name for e in engines}
    for uuid, capacity in capacities.items():
        mine = [e for e in engines if e.gpu_uuid == uuid]
        assert sum(limits[e.name] for e in mine) <= capacity
        assert all(0 <= limits[e.name] <= capacity for e in mine)
        if sum(e.min_bytes for e in mine) <= capacity:
            assert all(limits[e.name] >= e.min_bytes for e in mine)
    # Deterministic, and independent of the order engines are listed in.
    again = POLICIES[policy](_snapshot(list(reversed(engines)), dict(reversed(capacities.items()))))
    assert again == limits


@settings(max_examples=200, deadline=None)
@given(total=sizes, rows=st.lists(st.tuples(st.integers(0, 1000), sizes), max_size=10))
def test_capped_fill_properties(total: int, rows: list[tuple[int, int]]) -> None:
    shares, caps = [s for s, _ in rows], [c for _, c in rows]
    alloc = capped_fill(total, shares, caps)
    assert sum(alloc) <= total
    assert all(0 <= a <= c for a, c in zip(alloc, caps, strict=True))
    assert all(a == 0 for a, s in zip(alloc, shares, strict=True) if s == 0)
    if sum(c for c, s in zip(caps, shares, strict=True) if s > 0) <= total:
        assert all(a == c for a, c, s in zip(alloc, caps, shares, strict=True) if s > 0)  # enough for everyone


def test_demand_proportional_example() -> None:
    engines = [_engine("a", demand=30 * GiB, min_bytes=10 * GiB), _engine("b", demand=60 * GiB, min_bytes=0)]
    limits = POLICIES["demand"](_snapshot(engines, {"GPU-0": 50 * GiB}))
    # a: min 10 + wants 20 more; b wants 60. 40 GiB left, split 20:60 of the want.
    assert limits == {"a": 20 * GiB, "b": 30 * GiB}


def test_demand_surplus_goes_by_weight() -> None:
    engines = [_engine("a", demand=GiB, weight=3), _engine("b", demand=GiB, weight=1)]
    limits = POLICIES["demand"](_snapshot(engines, {"GPU-0": 10 * GiB}))
    assert limits == {"a": GiB + 6 * GiB, "b": GiB + 2 * GiB}


def test_weights_tilt_a_shortage() -> None:
    engines = [_engine("a", demand=10 * GiB, weight=3), _engine("b", demand=10 * GiB, weight=1)]
    assert POLICIES["demand"](_snapshot(engines, {"GPU-0": 8 * GiB})) == {"a": 6 * GiB, "b": 2 * GiB}


def test_equal_share_respects_mins() -> None:
    engines = [_engine("a", min_bytes=7 * GiB), _engine("b"), _engine("c")]
    assert POLICIES["equal"](_snapshot(engines, {"GPU-0": 12 * GiB})) == {"a": 7 * GiB, "b": 2.5 * GiB, "c": 2.5 * GiB}


def test_strict_priority() -> None:
    engines = [
        _engine("low", demand=8 * GiB, weight=1, min_bytes=GiB),
        _engine("high", demand=6 * GiB, weight=5),
        _engine("mid", demand=4 * GiB, weight=2),
    ]
    limits = POLICIES["priority"](_snapshot(engines, {"GPU-0": 12 * GiB}))
    assert limits == {"high": 6 * GiB, "mid": 4 * GiB, "low": 2 * GiB}
    plenty = POLICIES["priority"](_snapshot(engines, {"GPU-0": 20 * GiB}))
    assert plenty == {"high": 8 * GiB, "mid": 4 * GiB, "low": 8 * GiB}  # the surplus goes to the top


def test_sleeping_engines_get_their_min() -> None:
    engines = [_engine("a", demand=4 * GiB), _engine("zz", demand=4 * GiB, min_bytes=GiB, state=EngineState.SLEEPING)]
    for policy in POLICIES:
        assert POLICIES[policy](_snapshot(engines, {"GPU-0": 10 * GiB}))["zz"] == GiB, policy


def test_infeasible_mins_are_scaled_down() -> None:
    engines = [_engine("a", min_bytes=6 * GiB), _engine("b", min_bytes=2 * GiB)]
    assert POLICIES["demand"](_snapshot(engines, {"GPU-0": 4 * GiB})) == {"a": 3 * GiB, "b": GiB}


@pytest.mark.parametrize("share", [Fraction(1, 3), 0.1, 7])
def test_capped_fill_uses_exact_arithmetic(share: Fraction | float | int) -> None:
    assert sum(capped_fill(10**18 + 1, [share] * 3, [10**18] * 3)) <= 10**18 + 1
