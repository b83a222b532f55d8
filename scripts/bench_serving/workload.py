"""Workloads for the serving benchmark: arrival schedules, request lengths, token-id prompts.

Everything here is pure and deterministic for a given seed; nothing touches the network.
`run.py` imports it as a sibling module (the script directory on `sys.path`):

    from workload import StaggeredPeaks, build_requests
    schedule = StaggeredPeaks(["a", "b", "c"], peak_rps=12.0)
    requests = build_requests(schedule, kind="sharegpt", seed=0)

A schedule gives each model a request rate over time; `arrivals` turns it into send times (an
inhomogeneous Poisson process per model, by thinning); `build_requests` attaches prompt and
output lengths and random token ids, so that no two requests share a cacheable prefix.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

# ShareGPT-like lengths: log-normal around these medians, clipped to [_MIN_TOKENS, _MAX_TOKENS].
_SHAREGPT_PROMPT_MEDIAN_TOKENS = 180
_SHAREGPT_PROMPT_SIGMA = 0.9
_SHAREGPT_OUTPUT_MEDIAN_TOKENS = 160
_SHAREGPT_OUTPUT_SIGMA = 0.8
_MIN_TOKENS = 8
_MAX_TOKENS = 1024  # so prompt + output <= 2048 for every request

LENGTH_KINDS = ("fixed", "sharegpt")


@dataclass(frozen=True)
class Request:
    """One completion request: who gets it, when, and what it asks for."""

    idx: int
    model: str
    t: float  # send time, seconds from the start of the run
    prompt_ids: tuple[int, ...]
    max_tokens: int


@dataclass(frozen=True)
class Peak:
    """The corners of one model's rate bump, in seconds from the start."""

    start_s: float  # the rate leaves base_rps
    top_s: float  # the rate reaches peak_rps
    fall_s: float  # the rate starts to fall back
    end_s: float  # the rate is back at base_rps


class Schedule(Protocol):
    """Per-model request rate over [0, duration_s); zero outside it."""

    @property
    def models(self) -> Sequence[str]: ...

    @property
    def duration_s(self) -> float: ...

    def rate(self, model: str, t: float) -> float: ...

    def max_rate(self, model: str) -> float: ...

    def expected_count(self, model: str) -> float: ...

    def peak_window(self, model: str) -> tuple[float, float]: ...

    def describe(self) -> dict[str, Any]: ...


def _check_models(models: Sequence[str]) -> tuple[str, ...]:
    if isinstance(models, str):
        raise ValueError(f"models must be a sequence of names, not the string {models!r}")
    names = tuple(models)
    if not names or len(set(names)) != len(names) or not all(isinstance(m, str) and m for m in names):
        raise ValueError(f"models must be one or more distinct non-empty names, got {list(names)!r}")
    return names


def _check_non_negative(**values: float) -> None:
    for name, value in values.items():
        if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


@dataclass(frozen=True)
class StaggeredPeaks:
    """Every model idles at base_rps and, in turn, rises to peak_rps and back.

    Model i leaves base_rps at lead_s + i * offset_s, ramps linearly to peak_rps over ramp_s,
    holds hold_s, ramps back down over ramp_s, then stays at base_rps; the run ends tail_s after
    the last model's bump. With offset_s >= 2 * ramp_s + hold_s the bumps do not overlap.

    Raises:
        ValueError: no or repeated model names, a negative or non-finite parameter, or
            peak_rps < base_rps.
    """

    models: Sequence[str]
    peak_rps: float
    base_rps: float = 1.0
    lead_s: float = 4.0
    ramp_s: float = 4.0
    hold_s: float = 8.0
    offset_s: float = 12.0
    tail_s: float = 4.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "models", _check_models(self.models))
        _check_non_negative(
            peak_rps=self.peak_rps,
            base_rps=self.base_rps,
            lead_s=self.lead_s,
            ramp_s=self.ramp_s,
            hold_s=self.hold_s,
            offset_s=self.offset_s,
            tail_s=self.tail_s,
        )
        if self.peak_rps < self.base_rps:
            raise ValueError(f"peak_rps must be >= base_rps ({self.base_rps}), got {self.peak_rps}")
        if self.duration_s <= 0:
            raise ValueError("the schedule must last > 0 s: raise lead_s, ramp_s, hold_s or tail_s")

    @property
    def duration_s(self) -> float:
        return self.peak(self.models[-1]).end_s + self.tail_s

    def peak(self, model: str) -> Peak:
        """The corners of `model`'s bump. Raises ValueError for an unknown model."""
        start_s = self.lead_s + self._index(model) * self.offset_s
        top_s = start_s + self.ramp_s
        fall_s = top_s + self.hold_s
        return Peak(start_s, top_s, fall_s, fall_s + self.ramp_s)

    def peak_window(self, model: str) -> tuple[float, float]:
        peak = self.peak(model)
        return peak.start_s, peak.end_s

    def rate(self, model: str, t: float) -> float:
        peak = self.peak(model)
        if not 0 <= t < self.duration_s:
            return 0.0
        rise = self.peak_rps - self.base_rps
        if t < peak.start_s or t >= peak.end_s:
            return self.base_rps
        if t < peak.top_s:
            return self.base_rps + rise * (t - peak.start_s) / self.ramp_s
        if t < peak.fall_s:
            return self.peak_rps
        return self.base_rps + rise * (peak.end_s - t) / self.ramp_s

    def max_rate(self, model: str) -> float:
        self._index(model)
        return self.peak_rps

    def expected_count(self, model: str) -> float:
        """The integral of the rate: base over the whole run plus the bump (two ramps + hold)."""
        self._index(model)
        rise = self.peak_rps - self.base_rps
        return self.base_rps * self.duration_s + rise * (self.ramp_s + self.hold_s)

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "staggered_peaks",
            "models": list(self.models),
            "peak_rps": self.peak_rps,
            "base_rps": self.base_rps,
            "lead_s": self.lead_s,
            "ramp_s": self.ramp_s,
            "hold_s": self.hold_s,
            "offset_s": self.offset_s,
            "tail_s": self.tail_s,
            "duration_s": self.duration_s,
            "peak_windows": {m: list(self.peak_window(m)) for m in self.models},
        }

    def _index(self, model: str) -> int:
        try:
            return list(self.models).index(model)
        except ValueError:
            raise ValueError(f"unknown model {model!r}; the schedule has {list(self.models)}") from None


@dataclass(frozen=True)
class ConstantRate:
    """Every model at the same steady rate for duration_s (single-engine overhead runs).

    Raises:
        ValueError: no or repeated model names, rps < 0, or duration_s <= 0.
    """

    models: Sequence[str]
    rps: float
    duration_s: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "models", _check_models(self.models))
        _check_non_negative(rps=self.rps, duration_s=self.duration_s)
        if self.duration_s <= 0:
            raise ValueError(f"duration_s must be > 0, got {self.duration_s}")

    def rate(self, model: str, t: float) -> float:
        self._check(model)
        return self.rps if 0 <= t < self.duration_s else 0.0

    def max_rate(self, model: str) -> float:
        self._check(model)
        return self.rps

    def expected_count(self, model: str) -> float:
        self._check(model)
        return self.rps * self.duration_s

    def peak_window(self, model: str) -> tuple[float, float]:
        """The whole run: a constant rate has no distinguished peak."""
        self._check(model)
        return 0.0, self.duration_s

    def describe(self) -> dict[str, Any]:
        return {"kind": "constant", "models": list(self.models), "rps": self.rps, "duration_s": self.duration_s}

    def _check(self, model: str) -> None:
        if model not in self.models:
            raise ValueError(f"unknown model {model!r}; the schedule has {list(self.models)}")


def arrivals(schedule: Schedule, seed: int) -> list[tuple[float, str]]:
    """Send times for every model, sorted by time (ties by model name).

    Each model is an independent inhomogeneous Poisson process with intensity
    `schedule.rate(model, t)`, drawn by thinning a homogeneous process at `max_rate(model)`.
    Each model has its own random stream (seeded from `seed` and its name), so one model's
    arrivals do not depend on which other models are in the schedule.
    """
    out: list[tuple[float, str]] = []
    for model in schedule.models:
        max_rps = schedule.max_rate(model)
        if max_rps <= 0:
            continue
        rng = random.Random(f"arrivals:{seed}:{model}")
        t = 0.0
        while True:
            t += rng.expovariate(max_rps)
            if t >= schedule.duration_s:
                break
            if rng.random() * max_rps < schedule.rate(model, t):
                out.append((t, model))
    out.sort()
    return out


def lengths(kind: str, n: int, seed: int, prompt_len: int = 256, output_len: int = 256) -> list[tuple[int, int]]:
    """(prompt tokens, output tokens) for n requests.

    kind "fixed": (prompt_len, output_len) every time.
    kind "sharegpt": a ShareGPT-like spread (prompt_len and output_len are ignored): prompt
    lengths log-normal with median 180 tokens and sigma 0.9 (mean ~270), output lengths
    log-normal with median 160 and sigma 0.8 (mean ~220), each rounded and clipped to
    [8, 1024], so prompt + output <= 2048. Seeded by `seed`.

    Raises:
        ValueError: unknown kind, n < 0, or (for "fixed") a length < 1.
    """
    if kind not in LENGTH_KINDS:
        raise ValueError(f"kind must be one of {', '.join(LENGTH_KINDS)}, got {kind!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if kind == "fixed":
        if prompt_len < 1 or output_len < 1:
            raise ValueError(f"prompt_len and output_len must be >= 1, got {prompt_len} and {output_len}")
        return [(prompt_len, output_len)] * n
    rng = random.Random(f"lengths:{seed}")

    def draw(median_tokens: int, sigma: float) -> int:
        value = round(rng.lognormvariate(math.log(median_tokens), sigma))
        return min(max(value, _MIN_TOKENS), _MAX_TOKENS)

    out = []
    for _ in range(n):
        prompt_tokens = draw(_SHAREGPT_PROMPT_MEDIAN_TOKENS, _SHAREGPT_PROMPT_SIGMA)
        output_tokens = draw(_SHAREGPT_OUTPUT_MEDIAN_TOKENS, _SHAREGPT_OUTPUT_SIGMA)
        out.append((prompt_tokens, output_tokens))
    return out


def build_requests(
    schedule: Schedule,
    kind: str = "fixed",
    seed: int = 0,
    vocab: tuple[int, int] = (1000, 100000),
    prompt_len: int = 256,
    output_len: int = 256,
) -> list[Request]:
    """The whole run's requests, in send order (idx 0, 1, ... by time).

    Prompts are uniform random token ids in [vocab[0], vocab[1]) (vocab[1] must not exceed
    the served model's vocabulary size), fresh for every request, so no two requests share a
    cacheable prefix (two 16-token prefixes collide with probability ~1e-80). The same
    arguments always give the same list.

    Raises:
        ValueError: a bad vocab range, unknown kind or bad lengths (see `lengths`).
    """
    lo, hi = vocab
    if not (0 <= lo < hi):
        raise ValueError(f"vocab must be (low, high) with 0 <= low < high, got {vocab!r}")
    times = arrivals(schedule, seed)
    sizes = lengths(kind, len(times), seed, prompt_len, output_len)
    rng = random.Random(f"prompts:{seed}")
    token_ids = range(lo, hi)
    return [
        Request(idx, model, t, tuple(rng.choices(token_ids, k=prompt_tokens)), output_tokens)
        for idx, ((t, model), (prompt_tokens, output_tokens)) in enumerate(zip(times, sizes, strict=True))
    ]
