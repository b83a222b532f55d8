"""Rebalance policies: pure functions from a snapshot to new per-engine limits.

Each GPU is divided on its own: its capacity (the budget, else total minus headroom) is
split among its live engines. Every policy first gives each engine its ``min_bytes``
(scaled down pro rata if the mins alone exceed the capacity), gives a sleeping engine
no more than that, and never hands out more than the capacity in total. Arithmetic is
exact (integers and fractions), and the result does not depend on the order of engines.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from fractions import Fraction

from kvcached.control.layout import EngineState
from kvcached.control.snapshot import EngineInfo, Snapshot

__all__ = ["POLICIES", "Policy", "capped_fill", "demand_proportional", "equal_share", "strict_priority"]

Policy = Callable[[Snapshot], dict[str, int]]


def capped_fill(total: int, shares: Sequence[Fraction | int | float], caps: Sequence[int]) -> list[int]:
    """Split ``total`` in proportion to ``shares``, none above its cap (water-filling).

    What a capped entry cannot take goes to the others in the same proportion. Entries
    with a share or cap <= 0 get nothing. The sum is <= ``total`` (floors leave crumbs).
    """
    exact = [Fraction(s) if s > 0 else Fraction(0) for s in shares]
    alloc = [0] * len(exact)
    active = [i for i, s in enumerate(exact) if s > 0 and caps[i] > 0]
    remaining = total
    while active and remaining > 0:
        share_sum = sum(exact[i] for i in active)
        give = {i: int(remaining * exact[i] / share_sum) for i in active}
        capped = [i for i in active if give[i] >= caps[i] - alloc[i]]
        if not capped:
            for i in active:
                alloc[i] += give[i]
                remaining -= give[i]
            break
        for i in capped:
            remaining -= caps[i] - alloc[i]
            alloc[i] = caps[i]
        active = [i for i in active if i not in capped]
    return alloc


def _base(capacity: int, engines: list[EngineInfo]) -> tuple[list[int], int]:
    """Each engine's min (scaled down if infeasible) and what is left."""
    mins = [e.min_bytes for e in engines]
    if sum(mins) <= capacity:
        return mins, capacity - sum(mins)
    return capped_fill(capacity, mins, mins), 0


def _per_gpu(snapshot: Snapshot, split: Callable[[int, list[EngineInfo]], list[int]]) -> dict[str, int]:
    limits: dict[str, int] = {}
    for gpu in snapshot.gpus:
        engines = sorted(snapshot.engines_on(gpu.uuid), key=lambda e: e.name)
        if engines:
            limits.update(zip((e.name for e in engines), split(gpu.capacity_bytes, engines), strict=True))
    return limits


def _awake(engine: EngineInfo) -> bool:
    return engine.state != EngineState.SLEEPING


def _weight(engine: EngineInfo) -> Fraction:
    return Fraction(engine.weight) if engine.weight > 0 else Fraction(0)


def _split_demand(capacity: int, engines: list[EngineInfo]) -> list[int]:
    base, rest = _base(capacity, engines)
    wants = [max(e.demand_bytes - b, 0) if _awake(e) else 0 for e, b in zip(engines, base, strict=True)]
    grant = capped_fill(rest, [_weight(e) * w for e, w in zip(engines, wants, strict=True)], wants)
    surplus = rest - sum(grant)
    extra = capped_fill(surplus, [_weight(e) if _awake(e) else 0 for e in engines], [surplus] * len(engines))
    return [b + g + x for b, g, x in zip(base, grant, extra, strict=True)]


def _split_equal(capacity: int, engines: list[EngineInfo]) -> list[int]:
    base, rest = _base(capacity, engines)
    if rest == 0:
        return base
    # The largest level L with sum(max(min, L)) <= capacity over awake engines.
    awake = [i for i, e in enumerate(engines) if _awake(e)]
    pinned: set[int] = set()
    level = 0
    while len(pinned) < len(awake):
        free = [i for i in awake if i not in pinned]
        level = (capacity - sum(base[i] for i in range(len(engines)) if i not in free)) // len(free)
        newly = {i for i in free if base[i] > level}
        if not newly:
            break
        pinned |= newly
    return [max(b, level) if i in awake else b for i, b in enumerate(base)]


def _split_priority(capacity: int, engines: list[EngineInfo]) -> list[int]:
    order = sorted(range(len(engines)), key=lambda i: (-engines[i].weight, engines[i].name))
    mins = [e.min_bytes for e in engines]
    limits = [0] * len(engines)
    left = capacity
    for i in order:  # mins in priority order: the lowest priorities go short first
        limits[i] = min(mins[i], left)
        left -= limits[i]
    for i in order:
        if _awake(engines[i]):
            more = min(max(engines[i].demand_bytes - limits[i], 0), left)
            limits[i] += more
            left -= more
    top = next((i for i in order if _awake(engines[i])), None)
    if top is not None:
        limits[top] += left
    return limits


def demand_proportional(snapshot: Snapshot) -> dict[str, int]:
    """Mins first; then demand above the min, in proportion to weight x unmet demand; any
    surplus split by weight so engines can grow."""
    return _per_gpu(snapshot, _split_demand)


def equal_share(snapshot: Snapshot) -> dict[str, int]:
    """The same limit for every awake engine on a GPU, raised to an engine's min where needed."""
    return _per_gpu(snapshot, _split_equal)


def strict_priority(snapshot: Snapshot) -> dict[str, int]:
    """Higher weight first: mins, then demand, in weight order (name breaks ties); the
    surplus goes to the highest-priority awake engine."""
    return _per_gpu(snapshot, _split_priority)


POLICIES: dict[str, Policy] = {
    "demand": demand_proportional,
    "equal": equal_share,
    "priority": strict_priority,
}
