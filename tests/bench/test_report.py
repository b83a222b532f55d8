"""The serving benchmark's report: repeated overhead runs are pooled, pairs compared."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH_DIR = Path(__file__).resolve().parents[2] / "scripts" / "bench_serving"
sys.path.insert(0, str(BENCH_DIR))

from client import Result, summarize  # noqa: E402
from compare import p99_gain_interval  # noqa: E402
from report import (  # noqa: E402
    headline_table,
    load,
    memory_return,
    memory_table,
    overhead_table,
    pairs_table,
    timing_table,
)


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


def _multi(config: str, suffix: str, ttfts_ms: list[float], timing: dict | None = None) -> dict:
    results = [Result(i, "m0", 0.1 * i, 0.1 * i, t / 1e3, 1.0, 100, 0.01, True, None) for i, t in enumerate(ttfts_ms)]
    return {
        "label": f"{config}-fixed-10{suffix}",
        "kind": "fixed",
        "seed": 100,
        "schedule": {"kind": "staggered", "peak_rps": 10.0},
        "summary": summarize(results),
        "results": [r.to_dict() for r in results],
        "engine_timing": timing or {},
        "meta": {"config": config, "commit": "c"},
    }


def test_reruns_and_the_lifted_budget_are_compared_request_by_request():
    base = [20.0 + i % 7 for i in range(200)]
    runs = [
        _multi("static", "", base),
        _multi("kvcached", "", [t + 1.0 for t in base]),  # every request 1 ms slower
        _multi("kvcached", "-nobudget", base),
        _multi("static", "-r2", [t - 0.5 for t in base]),
    ]
    table = pairs_table(runs)
    rows = {tuple(c.strip() for c in line.strip("|").split("|")[2:4]): line for line in table.splitlines()[2:]}
    assert len(rows) == 6  # every two of the four runs
    cells = [c.strip() for c in rows[("static-fixed-10", "kvcached-fixed-10")].strip("|").split("|")]
    assert cells[4] == "200" and cells[6] == "+1.00" and cells[7] == "100%"
    cells = [c.strip() for c in rows[("kvcached-fixed-10", "kvcached-fixed-10-nobudget")].strip("|").split("|")]
    assert cells[6] == "-1.00" and cells[7] == "0%"
    # The headline pairs the plan's runs and the reruns, never a variant with a different setting.
    headline = headline_table([runs[0], runs[3]], [runs[1], runs[2]])
    assert headline.count("| kvcached @ c |") == 1
    assert pairs_table(runs[:2]).count("\n") == 1  # two runs: the headline already compares them


def test_a_control_under_other_kvcached_settings_is_its_own_configuration(tmp_path):
    base = [20.0 + i % 7 for i in range(200)]
    calls = {
        "static": (_multi("static", "", base), {}),
        "kvcached": (_multi("kvcached", "", base), {}),
        "control": (_multi("kvcached", "", [t + 2.0 for t in base]), {"KVCACHED_COMPACT": "off"}),
    }
    paths = []
    for name, (run, settings) in calls.items():
        meta = dict(run.pop("meta"), kvcached_env=settings)
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps({"meta": meta, "runs": [run]}))
    by = load([str(p) for p in paths])
    assert sorted(by) == ["kvcached", "kvcached-compact-off", "static"]
    (control,) = by["kvcached-compact-off"]
    assert control["label"] == "kvcached-compact-off-fixed-10" and by["kvcached"][0]["label"] == "kvcached-fixed-10"
    headline = headline_table(by["static"], by["kvcached"], by["kvcached-compact-off"])
    assert headline.count("| kvcached @ c |") == 1 and headline.count("| kvcached-compact-off @ c |") == 1
    pairs = pairs_table(by["static"] + by["kvcached"] + by["kvcached-compact-off"])
    row = next(line for line in pairs.splitlines() if "| kvcached-fixed-10 | kvcached-compact-off-fixed-10 |" in line)
    assert "| +2.00 | 100% |" in row  # the control, request by request against compaction on
    # A one-run file --split wrote is read back under the same configuration and label.
    split = tmp_path / "split.json"
    split.write_text(json.dumps(control))
    (again,) = load([str(split)])["kvcached-compact-off"]
    assert again["label"] == "kvcached-compact-off-fixed-10"


def test_the_timing_table_splits_the_engines_ttft_and_weights_by_requests():
    timing = {
        "m0": {"ttft_mean_s": 0.030, "ttft_n": 100, "queue_mean_s": 0.005, "queue_n": 100, "prefill_mean_s": 0.020, "prefill_n": 100},
        "m1": {"ttft_mean_s": 0.060, "ttft_n": 100, "queue_mean_s": 0.010, "queue_n": 100, "prefill_mean_s": 0.040, "prefill_n": 100},
        "m2": {"ttft_mean_s": None, "ttft_n": 0, "queue_mean_s": None, "queue_n": 0, "prefill_mean_s": None, "prefill_n": 0},
    }
    run = _multi("kvcached", "", [50.0] * 200, timing)
    row = timing_table([run, _multi("static", "", [50.0])]).splitlines()[2:]
    assert len(row) == 1  # a run without vLLM's histograms has no row
    cells = [c.strip() for c in row[0].strip("|").split("|")]
    assert cells == ["kvcached-fixed-10", "200", "50.00", "45.00", "7.50", "30.00", "7.50", "5.00"]
    assert timing_table([_multi("static", "", [50.0])]) == ""


def test_memory_back_is_timed_from_the_drain_and_splits_what_stays_mapped():
    MiB = 1 << 20
    samples = []
    for i in range(60):  # 0.25 s apart; the peak runs 3-8 s
        t = i * 0.25
        peak = 3.0 <= t < 8.0
        after = 8.0 <= t < 9.5  # the last requests of the peak still run
        running, mapped, used = (40, 4096, 2048) if peak else (3, 1024, 256) if after else (1, 384, 64)
        samples.append({"t": t, "engines": {"m0": {"num_requests_running": running, "num_requests_waiting": 0,
                                                   "mapped": mapped * MiB, "used": used * MiB, "cached": 128 * MiB}}})
    run = {"label": "kvcached-fixed-10", "peak_windows": {"m0": (3.0, 8.0)}, "samples": samples}
    (m,) = memory_return(run)
    assert m["t_drain"] == 8.0 and m["t_mem"] == 9.5 and m["lag_s"] == 1.5  # base 384 MiB (+256 MiB)
    assert m["after_1s"] == {"mapped": 1024 * MiB, "used": 256 * MiB, "cached": 128 * MiB}
    row = memory_table([run]).splitlines()[2]
    assert row.endswith("| 1.5 | 1,024 / 256 / 128 |")
