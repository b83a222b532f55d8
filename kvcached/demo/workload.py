"""Request streams for the demo engines: a steady trickle with intermittent, staggered peaks.

A stream is a pure function of its :class:`Workload` (seed included), indexed by
scheduler step, so the live engine and the summary's replays (a static split, no
limit at all) see exactly the same requests.

Arrivals are Poisson per step. The rate sits at ``base_rate`` and rises to about
``peak_rate`` in a raised-cosine bump lasting ``peak_s`` once every ``period_s``; each
engine's bumps start at its own ``phase_s``, and every bump's start and height are
jittered, so engines peak in turn and no two cycles look alike.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

__all__ = ["Arrival", "Workload", "arrivals", "rate_at"]


@dataclass(frozen=True)
class Workload:
    """One engine's request stream. Times in seconds, rates in requests per second."""

    seed: int = 0
    step_s: float = 0.05  # one scheduler step (a decode iteration)
    base_rate: float = 2.0
    peak_rate: float = 30.0
    period_s: float = 12.0
    peak_s: float = 4.0
    phase_s: float = 1.0  # start of this engine's first peak
    jitter_s: float = 0.5  # each peak starts up to this much early or late
    prompt_tokens: tuple[int, int] = (128, 1536)
    output_tokens: tuple[int, int] = (64, 384)
    tokens_per_step: int = 4  # tokens each running request decodes per step
    max_wait_s: float = 3.0  # a request not started by then is refused (the client gave up)

    def __post_init__(self) -> None:
        if not (self.step_s > 0 and self.period_s > 0 and 0 < self.peak_s <= self.period_s):
            raise ValueError("step_s and period_s must be > 0 and 0 < peak_s <= period_s")
        if self.base_rate < 0 or self.peak_rate < 0 or self.tokens_per_step < 1 or self.max_wait_s < 0:
            raise ValueError("rates and max_wait_s must be >= 0, tokens_per_step >= 1")
        for lo, hi in (self.prompt_tokens, self.output_tokens):
            if not 1 <= lo <= hi:
                raise ValueError(f"token ranges must satisfy 1 <= low <= high, got {(lo, hi)}")

    @property
    def max_wait_steps(self) -> int:
        return round(self.max_wait_s / self.step_s)


@dataclass(frozen=True)
class Arrival:
    """A request as it arrives: which step, how long its prompt is, how much it will write."""

    request_id: int
    step: int
    prompt_tokens: int
    output_tokens: int


def _peak_shape(cycle_rng: random.Random) -> tuple[float, float]:
    return cycle_rng.uniform(-1.0, 1.0), cycle_rng.uniform(0.7, 1.2)


def rate_at(workload: Workload, t_s: float) -> float:
    """The arrival rate at ``t_s`` seconds into the stream."""
    w = workload
    rate = w.base_rate
    cycle = math.floor((t_s - w.phase_s) / w.period_s)
    for c in (cycle - 1, cycle, cycle + 1):  # a jittered bump may spill into a neighbour cycle
        if c < 0:
            continue
        shift, height = _peak_shape(random.Random(f"{w.seed}/{c}"))
        start = w.phase_s + c * w.period_s + shift * w.jitter_s
        x = (t_s - start) / w.peak_s
        if 0.0 <= x <= 1.0:
            rate += (w.peak_rate - w.base_rate) * height * 0.5 * (1.0 - math.cos(2.0 * math.pi * x))
    return rate


def _lengths(rng: random.Random, span: tuple[int, int]) -> int:
    # Log-uniform: many short, a few long, as in chat traffic.
    lo, hi = span
    return min(hi, max(lo, round(math.exp(rng.uniform(math.log(lo), math.log(hi))))))


def _poisson(rng: random.Random, mean: float) -> int:
    # Knuth's method: fine for the small per-step means used here.
    limit, k, p = math.exp(-mean), 0, rng.random()
    while p > limit:
        k += 1
        p *= rng.random()
    return k


def arrivals(workload: Workload, num_steps: int) -> list[list[Arrival]]:
    """The requests arriving at each of the first ``num_steps`` steps (deterministic)."""
    rng = random.Random(workload.seed)
    out: list[list[Arrival]] = []
    next_id = 0
    for step in range(num_steps):
        mean = rate_at(workload, step * workload.step_s) * workload.step_s
        batch = []
        for _ in range(_poisson(rng, mean)):
            batch.append(
                Arrival(next_id, step, _lengths(rng, workload.prompt_tokens), _lengths(rng, workload.output_tokens))
            )
            next_id += 1
        out.append(batch)
    return out
