"""The serving benchmark's report: repeated overhead runs are pooled, pairs compared."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH_DIR = Path(__file__).resolve().parents[2] / "scripts" / "bench_serving"
sys.path.insert(0, str(BENCH_DIR))

from client import Result, summarize  # noqa: E402
from report import overhead_table, p99_gain_interval  # noqa: E402


def _run(mode: str, rep: int, ttfts_ms: list[float]) -> dict:
    results = [
        Result(i, mode, 0.1 * i, 0.1 * i, t / 1e3, 1.0 + 0.1, 200, 0.005, True, None) for i, t in enumerate(ttfts_ms)
    ]
    return {
        "label": f"overhead-{mode}-medium-r{rep}",
        "schedule": {"kind": "constant", "rps": 8.0, "models": [mode]},
        "summary": summarize(results),
        "results": [r.to_dict() for r in results],
    }


def test_repeats_are_pooled_and_each_pair_is_compared():
    runs = [
        _run("vanilla", 1, [20, 30, 40]),
        _run("kvcached", 1, [22, 33, 44]),  # 10% slower
        _run("vanilla", 2, [30, 40, 50]),
        _run("kvcached", 2, [30, 40, 50]),  # equal
    ]
    table = overhead_table(runs)
    row = next(line for line in table.splitlines() if line.startswith("| medium "))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == "2"  # runs per side
    assert cells[3] == "6"  # requests pooled over both repeats
    assert cells[8] == "35 / 37"  # TTFT p50 over all six requests of each side
    assert cells[-1] == "1.10×, 1.00×"  # each pair's p50 ratio, in repeat order


def test_the_p99_gain_interval_pairs_requests_and_brackets_the_truth():
    import random

    rng = random.Random(1)
    ttfts = [rng.lognormvariate(-2.5, 0.5) for _ in range(500)]  # seconds, a long right tail

    def run(scale: float) -> dict:
        return {"results": [{"idx": i, "ok": True, "ttft_s": t * scale} for i, t in enumerate(ttfts)]}

    same = p99_gain_interval(run(1.0), run(1.0))
    assert same == (1.0, 1.0)  # paired: identical requests give exactly no difference
    low, high = p99_gain_interval(run(1.0), run(0.5))  # kvcached twice as fast on every request
    assert low == pytest.approx(2.0) and high == pytest.approx(2.0)
    noisy = {"results": [{"idx": i, "ok": True, "ttft_s": t * rng.uniform(0.8, 1.2)} for i, t in enumerate(ttfts)]}
    low, high = p99_gain_interval(run(1.0), noisy)
    assert low < 1.0 < high  # per-request noise, no shift: the interval holds parity
    assert p99_gain_interval(run(1.0), {"results": []}) is None  # runs that do not pair up
