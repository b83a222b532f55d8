"""The reserve sizing rule, driven with an explicit clock."""

from __future__ import annotations

import pytest

from kvcached.envs import EnvError
from kvcached.pool import ReserveConfig, ReservePolicy

CFG = ReserveConfig(min_pages=1, max_pages=16, trim_idle_s=0.5, lead_s=0.25, half_life_s=0.5)


def test_target_follows_the_draw_rate_and_is_clamped():
    policy = ReservePolicy(CFG, now=0.0)
    draws = allocs = 0
    plan = policy.plan(0.0, draws, allocs)
    for step in range(1, 41):  # 20 pages per 10 ms = 2000 pages/s for 0.4 s
        draws += 20
        allocs += 40
        plan = policy.plan(step * 0.01, draws, allocs)
    assert policy.rate_pages_per_s > 0.4 * 2000
    assert plan.target_pages == 16 and plan.keep_pages == 16 and not plan.idle
    policy2 = ReservePolicy(CFG, now=0.0)
    for step in range(1, 41):  # 1 page per 50 ms = 20 pages/s: 5 more pages than the minimum ahead
        policy2.plan(step * 0.05, step, step)
    plan = policy2.plan(2.0, 40, 41)
    assert 15 < policy2.rate_pages_per_s <= 20
    assert plan.target_pages == 1 + 5 and plan.keep_pages == 13


def test_rate_halves_every_half_life_once_draws_stop():
    policy = ReservePolicy(CFG, now=0.0)
    for step in range(1, 101):
        policy.plan(step * 0.01, step * 2, step)  # 200 pages/s for 1 s
    rate = policy.rate_pages_per_s
    policy.plan(1.5, 200, 150)  # no draws for 0.5 s, but allocations go on
    assert policy.rate_pages_per_s == pytest.approx(rate / 2, rel=0.01)


def test_idle_trims_to_the_minimum_at_once():
    policy = ReservePolicy(CFG, now=0.0)
    for step in range(1, 11):
        policy.plan(step * 0.01, step * 10, step)
    assert policy.plan(0.2, 100, 10).target_pages > 1
    plan = policy.plan(0.1 + CFG.trim_idle_s, 100, 10)  # last allocation seen at 0.1
    assert plan == (1, 1, True)
    assert not policy.plan(0.7, 100, 11).idle  # an allocation wakes it


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(min_pages=3, max_pages=2), "0 <= min"),
        (dict(min_pages=-1), "0 <= min"),
        (dict(trim_idle_s=-1.0), "trim_idle_s must be >= 0"),
        (dict(tick_s=0.0), "tick_s must be > 0"),
        (dict(map_batch_pages=0), "map_batch_pages must be >= 1"),
    ],
)
def test_bad_config_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ReserveConfig(**kwargs)


def test_config_from_env(monkeypatch):
    monkeypatch.setenv("KVCACHED_RESERVE_MIN_PAGES", "3")
    monkeypatch.setenv("KVCACHED_RESERVE_MAX_PAGES", "2")
    monkeypatch.setenv("KVCACHED_TRIM_IDLE_S", "0.25")
    cfg = ReserveConfig.from_env()
    assert (cfg.min_pages, cfg.max_pages, cfg.trim_idle_s) == (3, 3, 0.25)
    monkeypatch.setenv("KVCACHED_TRIM_IDLE_S", "soon")
    with pytest.raises(EnvError, match="KVCACHED_TRIM_IDLE_S"):
        ReserveConfig.from_env()
