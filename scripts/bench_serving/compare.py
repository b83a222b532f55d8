"""Two runs that sent the same requests (same seed), compared request by request.

The serving benchmark's runs are paired by design: static and kvcached, or a run and its
rerun, get identical arrivals and prompts, so differences can be taken per request and
intervals drawn by a paired bootstrap instead of treating the runs as independent samples.
"""

from __future__ import annotations

import random
import statistics
from typing import Any


def ttfts(run: dict[str, Any]) -> dict[int, float]:
    """TTFT (s) of each request that succeeded, by request index."""
    return {r["idx"]: r["ttft_s"] for r in run.get("results", ()) if r.get("ok")}


def request_deltas(a: dict[str, Any], b: dict[str, Any]) -> list[float]:
    """TTFT of b minus TTFT of a, request by request (requests both served)."""
    ta, tb = ttfts(a), ttfts(b)
    return [t - ta[i] for i, t in tb.items() if i in ta]


def p99_gain_interval(static_run: dict[str, Any], elastic_run: dict[str, Any], resamples: int = 2000) -> tuple[float, float] | None:
    """A 95% interval for the TTFT p99 gain (static p99 / kvcached p99), by a paired
    bootstrap: both runs sent the same requests (same seed), so each resample draws request
    indices with replacement and takes both configurations' TTFTs of those requests. None
    when the runs do not pair up."""
    s, k = ttfts(static_run), ttfts(elastic_run)
    idx = sorted(s.keys() & k.keys())
    if len(idx) < 100:
        return None
    rng = random.Random(0)

    def p99(values: list[float]) -> float:
        return statistics.quantiles(values, n=100, method="inclusive")[98]  # numpy's linear p99

    gains = []
    for _ in range(resamples):
        draw = rng.choices(idx, k=len(idx))
        gains.append(p99([s[i] for i in draw]) / p99([k[i] for i in draw]))
    gains.sort()
    return gains[int(0.025 * resamples)], gains[int(0.975 * resamples) - 1]


def interval_text(interval: tuple[float, float] | None) -> str:
    return "–" if interval is None else f"{interval[0]:.2f}–{interval[1]:.2f}×"
