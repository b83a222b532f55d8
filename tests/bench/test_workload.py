"""The serving benchmark's workload: rate schedules, Poisson arrivals, lengths, prompts."""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts" / "bench_serving"))

from workload import ConstantRate, StaggeredPeaks, arrivals, build_requests, lengths


def _three(**overrides: float) -> StaggeredPeaks:
    params = {
        "peak_rps": 10.0,
        "base_rps": 1.0,
        "lead_s": 4.0,
        "ramp_s": 4.0,
        "hold_s": 8.0,
        "offset_s": 12.0,
        "tail_s": 4.0,
    }
    params.update(overrides)
    return StaggeredPeaks(["a", "b", "c"], **params)


def test_staggered_rate_shape():
    schedule = _three()
    # c leaves base at 4 + 2 * 12 = 28 and is back at 28 + 4 + 8 + 4 = 44; 4 s of tail.
    assert schedule.duration_s == 48.0
    assert [schedule.peak_window(m) for m in "abc"] == [(4.0, 20.0), (16.0, 32.0), (28.0, 44.0)]
    rate_a = [schedule.rate("a", t) for t in (0.0, 3.9, 6.0, 8.0, 12.0, 15.9, 18.0, 20.0, 47.9)]
    assert rate_a == pytest.approx([1.0, 1.0, 5.5, 10.0, 10.0, 10.0, 5.5, 1.0, 1.0])
    # b is the same bump, offset_s later; before its window it idles at base.
    for t in (0.0, 5.0, 10.0, 15.9):
        assert schedule.rate("b", t) == 1.0
    for t in (6.0, 8.0, 12.0, 18.0):
        assert schedule.rate("b", t + 12.0) == pytest.approx(schedule.rate("a", t))
        assert schedule.rate("c", t + 24.0) == pytest.approx(schedule.rate("a", t))
    assert schedule.rate("a", -0.1) == 0.0 and schedule.rate("a", 48.0) == 0.0
    assert schedule.max_rate("b") == 10.0
    assert schedule.expected_count("a") == pytest.approx(1.0 * 48 + 9.0 * (4 + 8))


def test_expected_count_is_the_integral_of_the_rate():
    schedule = _three(peak_rps=7.0, base_rps=0.5, ramp_s=3.0, hold_s=2.0, offset_s=5.0)
    step = 0.004
    for model in schedule.models:
        integral = sum(schedule.rate(model, (k + 0.5) * step) for k in range(int(schedule.duration_s / step))) * step
        assert integral == pytest.approx(schedule.expected_count(model), rel=1e-3)


def test_zero_ramp_is_a_step():
    schedule = _three(ramp_s=0.0)
    assert schedule.rate("a", 3.99) == 1.0
    assert schedule.rate("a", 4.0) == 10.0
    assert schedule.rate("a", 12.0) == 1.0


def test_describe_is_json_and_complete():
    described = json.loads(json.dumps(_three().describe()))
    assert described["kind"] == "staggered_peaks"
    assert described["models"] == ["a", "b", "c"]
    assert described["duration_s"] == 48.0
    assert described["peak_windows"]["b"] == [16.0, 32.0]
    constant = json.loads(json.dumps(ConstantRate(["x"], 3.0, 10.0).describe()))
    assert constant == {"kind": "constant", "models": ["x"], "rps": 3.0, "duration_s": 10.0}


def test_constant_rate():
    schedule = ConstantRate(["x", "y"], rps=3.0, duration_s=10.0)
    assert schedule.rate("y", 0.0) == 3.0 and schedule.rate("y", 9.99) == 3.0
    assert schedule.rate("y", 10.0) == 0.0
    assert schedule.peak_window("x") == (0.0, 10.0)
    assert schedule.expected_count("x") == 30.0


def test_arrival_counts_follow_the_rate():
    schedule = _three(peak_rps=20.0)
    times = arrivals(schedule, seed=7)
    assert times == sorted(times)
    assert all(0 <= t < schedule.duration_s for t, _ in times)
    for model in schedule.models:
        mine = [t for t, m in times if m == model]
        expected = schedule.expected_count(model)
        assert abs(len(mine) - expected) < 4 * math.sqrt(expected), model
        # The hold window (8 s at 20 rps) against an equally long stretch at base rate (1 rps).
        peak = schedule.peak(model)
        in_hold = sum(peak.top_s <= t < peak.fall_s for t in mine)
        assert abs(in_hold - 160) < 4 * math.sqrt(160)
        assert sum(0 <= t < 4.0 for t in mine) < 15


def test_a_models_arrivals_do_not_depend_on_the_others():
    alone = arrivals(ConstantRate(["a"], 5.0, 10.0), seed=3)
    together = [(t, m) for t, m in arrivals(ConstantRate(["a", "b"], 5.0, 10.0), seed=3) if m == "a"]
    assert alone == together


def test_build_requests_is_deterministic_per_seed():
    schedule = _three(lead_s=1.0, hold_s=2.0, offset_s=3.0, tail_s=1.0)
    first = build_requests(schedule, kind="sharegpt", seed=11)
    assert first == build_requests(schedule, kind="sharegpt", seed=11)
    other = build_requests(schedule, kind="sharegpt", seed=12)
    assert [r.t for r in first] != [r.t for r in other]
    assert [r.prompt_ids for r in first] != [r.prompt_ids for r in other]


def test_fixed_requests_have_distinct_prompts_in_the_vocab():
    schedule = _three(lead_s=1.0, hold_s=2.0, offset_s=3.0, tail_s=1.0)
    requests = build_requests(schedule, seed=0, vocab=(1000, 32000))
    assert len(requests) > 50
    assert [r.idx for r in requests] == list(range(len(requests)))
    assert [r.t for r in requests] == sorted(r.t for r in requests)
    assert {r.model for r in requests} == {"a", "b", "c"}
    assert all(len(r.prompt_ids) == 256 and r.max_tokens == 256 for r in requests)
    assert all(1000 <= tok < 32000 for r in requests for tok in r.prompt_ids)
    # No two requests share even one 16-token block, so a prefix cache cannot help.
    assert len({r.prompt_ids[:16] for r in requests}) == len(requests)
    short = build_requests(schedule, seed=0, prompt_len=32, output_len=8)
    assert {(len(r.prompt_ids), r.max_tokens) for r in short} == {(32, 8)}


def test_sharegpt_lengths_are_bounded_and_spread():
    pairs = lengths("sharegpt", 4000, seed=5)
    prompts = [p for p, _ in pairs]
    outputs = [o for _, o in pairs]
    assert all(8 <= p <= 1024 and 8 <= o <= 1024 and p + o <= 2048 for p, o in pairs)
    assert statistics.median(prompts) == pytest.approx(180, rel=0.1)
    assert statistics.median(outputs) == pytest.approx(160, rel=0.1)
    assert len(set(prompts)) > 300 and len(set(outputs)) > 300
    assert min(prompts) < 40 and max(prompts) > 800
    assert pairs == lengths("sharegpt", 4000, seed=5)
    assert pairs != lengths("sharegpt", 4000, seed=6)
    assert lengths("fixed", 3, seed=0, prompt_len=10, output_len=20) == [(10, 20)] * 3


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: StaggeredPeaks(["a"], peak_rps=-1.0, base_rps=0.0), "peak_rps must be a finite number >= 0"),
        (lambda: StaggeredPeaks(["a"], peak_rps=2.0, base_rps=3.0), "peak_rps must be >= base_rps"),
        (lambda: StaggeredPeaks(["a"], peak_rps=2.0, ramp_s=float("nan")), "ramp_s must be a finite number"),
        (lambda: StaggeredPeaks([], peak_rps=2.0), "models must be one or more distinct"),
        (lambda: StaggeredPeaks(["a", "a"], peak_rps=2.0), "models must be one or more distinct"),
        (lambda: StaggeredPeaks("ab", peak_rps=2.0), "models must be a sequence of names"),
        (lambda: _three().rate("z", 1.0), "unknown model 'z'"),
        (lambda: ConstantRate(["a"], rps=-1.0, duration_s=5.0), "rps must be a finite number >= 0"),
        (lambda: ConstantRate(["a"], rps=1.0, duration_s=0.0), "duration_s must be > 0"),
        (lambda: ConstantRate(["a"], rps=1.0, duration_s=5.0).peak_window("b"), "unknown model 'b'"),
        (lambda: lengths("zipf", 3, seed=0), "kind must be one of fixed, sharegpt"),
        (lambda: lengths("fixed", -1, seed=0), "n must be >= 0"),
        (lambda: lengths("fixed", 3, seed=0, prompt_len=0), "prompt_len and output_len must be >= 1"),
        (lambda: build_requests(ConstantRate(["a"], 1.0, 1.0), vocab=(5, 5)), "vocab must be"),
        (lambda: build_requests(ConstantRate(["a"], 1.0, 1.0), kind="nope"), "kind must be one of"),
    ],
)
def test_bad_arguments_name_what_is_allowed(make, message):
    with pytest.raises(ValueError, match=message):
        make()
