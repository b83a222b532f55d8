"""The load driver: sends `workload.Request`s to OpenAI-compatible servers and times them.

    from client import run_in_processes, summarize, summarize_by_model
    results = run_in_processes(requests, {"a": "http://127.0.0.1:8001", "b": ...})
    print(summarize(results), summarize_by_model(results))

Each request is a streaming POST to `{url}/v1/completions` sent at its planned offset from a
shared wall-clock start. TTFT is measured from the actual send to the first chunk that carries
text; TPOT is (e2e - TTFT) / (output tokens - 1). `run_in_processes` gives every model its own
process and event loop, because one loop parsing thousands of chunks per second falls behind
and inflates the times it measures. A failed request is a Result with ok=False, never an
exception. Try it on a CPU machine against `fake_server.py`.
"""

from __future__ import annotations

import asyncio
import json
import math
import multiprocessing
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import aiohttp
from workload import Request

_ERROR_BODY_CHARS = 300


@dataclass
class Result:
    """What happened to one request. Times are seconds; offsets are from the run's t0."""

    idx: int
    model: str
    t_sched: float  # planned send offset
    t_sent: float  # actual send offset
    ttft_s: float | None  # None if no token arrived or the request failed
    e2e_s: float  # send to the end of the stream (or to the failure)
    n_out: int  # completion tokens
    tpot_s: float | None  # None if n_out < 2 or the request failed
    ok: bool
    error: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Stream:
    """What the event stream of one response said so far."""

    ttft_s: float | None = None
    num_text_chunks: int = 0
    usage_tokens: int | None = None
    done: bool = False
    error: str | None = None


def _read_event(line: bytes, stream: _Stream, elapsed_s: float) -> None:
    text = line.strip()
    if not text.startswith(b"data:"):
        return  # blank separators, comments, other SSE fields
    data = text[len(b"data:") :].strip()
    if data == b"[DONE]":
        stream.done = True
        return
    try:
        event = json.loads(data)
        if event.get("error"):
            stream.error = f"server error in stream: {json.dumps(event['error'])[:_ERROR_BODY_CHARS]}"
            return
        usage = event.get("usage")
        if usage and usage.get("completion_tokens") is not None:
            stream.usage_tokens = int(usage["completion_tokens"])
        has_text = any(choice.get("text") for choice in event.get("choices") or ())
    except (ValueError, AttributeError, TypeError, KeyError) as exc:
        raise ValueError(f"malformed event: {data[:_ERROR_BODY_CHARS]!r}") from exc
    if has_text:
        stream.num_text_chunks += 1
        if stream.ttft_s is None:
            stream.ttft_s = elapsed_s


async def _send(session: aiohttp.ClientSession, req: Request, url: str, perf0: float) -> Result:
    payload = {
        "model": req.model,
        "prompt": list(req.prompt_ids),
        "max_tokens": req.max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    stream = _Stream()
    start = time.perf_counter()
    t_sent = start - perf0
    error: str | None = None
    try:
        async with session.post(f"{url.rstrip('/')}/v1/completions", json=payload) as resp:
            if resp.status != 200:
                body = await resp.text(errors="replace")
                error = f"HTTP {resp.status}: {body.strip()[:_ERROR_BODY_CHARS]}"
            else:
                pending = b""
                async for data in resp.content.iter_any():
                    pending += data
                    *lines, pending = pending.split(b"\n")
                    for line in lines:
                        _read_event(line, stream, time.perf_counter() - start)
                _read_event(pending, stream, time.perf_counter() - start)
                error = stream.error
                if error is None and not stream.done:
                    error = "stream ended without data: [DONE]"
    except asyncio.TimeoutError:
        error = "timed out"
    except (aiohttp.ClientError, OSError, ValueError) as exc:  # ValueError: a malformed event
        error = f"{type(exc).__name__}: {exc}"
    e2e_s = time.perf_counter() - start
    n_out = stream.usage_tokens if stream.usage_tokens is not None else stream.num_text_chunks
    if error is None and stream.ttft_s is None:
        error = "no token in the response"
    ok = error is None
    ttft_s = stream.ttft_s if ok else None
    tpot_s = (e2e_s - ttft_s) / (n_out - 1) if ttft_s is not None and n_out >= 2 else None
    return Result(req.idx, req.model, req.t, t_sent, ttft_s, e2e_s, n_out, tpot_s, ok, error)


async def run_requests(
    requests: Sequence[Request],
    urls: Mapping[str, str],
    t0: float | None = None,
    timeout_s: float = 600.0,
    on_result: Callable[[Result], None] | None = None,
) -> list[Result]:
    """Send every request at t0 + req.t and wait for all of them.

    Args:
        requests: in any order.
        urls: base URL ("http://host:port") of the server for each model.
        t0: the run's wall-clock start (`time.time()`); default now. Requests whose time has
            already passed go out at once (their t_sent shows the lag).
        timeout_s: limit on each request as a whole, streaming included.
        on_result: called in the event loop with each Result as it completes.

    Returns:
        One Result per request, in the order of `requests`.

    Raises:
        ValueError: a request's model has no URL.
    """
    missing = sorted({req.model for req in requests} - urls.keys())
    if missing:
        raise ValueError(f"no URL for model(s) {missing}; urls has {sorted(urls)}")
    # Offsets are from the wall-clock t0 but measured with perf_counter.
    wall0 = time.time() if t0 is None else t0
    perf0 = time.perf_counter() - (time.time() - wall0)
    order = sorted(range(len(requests)), key=lambda i: requests[i].t)
    tasks: dict[int, asyncio.Task[Result]] = {}

    async def send_and_report(session: aiohttp.ClientSession, req: Request) -> Result:
        result = await _send(session, req, urls[req.model], perf0)
        if on_result is not None:
            on_result(result)
        return result

    # Idle connections are dropped before uvicorn closes its side (5 s keep-alive): a request
    # sent on a connection the server is closing fails with "Server disconnected" at once.
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=3.0)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        for i in order:
            delay_s = perf0 + requests[i].t - time.perf_counter()
            if delay_s > 0:
                await asyncio.sleep(delay_s)
            tasks[i] = asyncio.create_task(send_and_report(session, requests[i]))
        await asyncio.gather(*tasks.values())
    return [tasks[i].result() for i in range(len(requests))]


def _run_one_model(requests: list[Request], urls: dict[str, str], t0: float, timeout_s: float) -> list[Result]:
    return asyncio.run(run_requests(requests, urls, t0, timeout_s))


def run_in_processes(
    requests: Sequence[Request],
    urls: Mapping[str, str],
    t0: float | None = None,
    timeout_s: float = 600.0,
) -> list[Result]:
    """`run_requests` with one spawned worker process per model, all sharing one t0.

    t0 defaults to now + 1 s, so that every worker has started before the first send. The
    calling script must guard its entry point with `if __name__ == "__main__":` (spawn
    re-imports it), and this module and `workload` must be importable from sys.path.

    Returns:
        Every Result, sorted by idx.

    Raises:
        ValueError: a request's model has no URL.
    """
    missing = sorted({req.model for req in requests} - urls.keys())
    if missing:
        raise ValueError(f"no URL for model(s) {missing}; urls has {sorted(urls)}")
    by_model: dict[str, list[Request]] = {}
    for req in requests:
        by_model.setdefault(req.model, []).append(req)
    if not by_model:
        return []
    start = time.time() + 1.0 if t0 is None else t0
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=len(by_model), mp_context=context) as pool:
        futures = [
            pool.submit(_run_one_model, reqs, {model: urls[model]}, start, timeout_s)
            for model, reqs in by_model.items()
        ]
        results = [result for future in futures for result in future.result()]
    return sorted(results, key=lambda r: r.idx)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation between closest ranks.

    The same as numpy's default ("linear") method: position (n - 1) * q / 100 in the sorted
    values, interpolated between its neighbours. Raises ValueError for no values or q outside
    [0, 100].
    """
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q}")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _stats(prefix: str, values: Sequence[float], names: Sequence[str]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for name in names:
        key = f"{prefix}_{name}_s"
        if not values:
            out[key] = None
        elif name == "mean":
            out[key] = statistics.fmean(values)
        elif name == "max":
            out[key] = max(values)
        else:
            out[key] = percentile(values, float(name[1:]))
    return out


def summarize(results: Sequence[Result], duration_s: float | None = None) -> dict[str, Any]:
    """Counts, latency statistics and throughput of a set of results (JSON-able, flat).

    Latencies (seconds) cover the successful requests only: ttft_{mean,p50,p90,p99,max}_s,
    tpot_{mean,p50,p99}_s (requests with >= 2 tokens), e2e_{mean,p99}_s; None when there is
    nothing to measure. Percentiles interpolate linearly (see `percentile`).
    output_tokens_per_s and requests_per_s count successful requests over `span_s`: duration_s
    if given, else from the first send to the last completion of any request.
    """
    good = [r for r in results if r.ok]
    ttfts = [r.ttft_s for r in good if r.ttft_s is not None]
    tpots = [r.tpot_s for r in good if r.tpot_s is not None]
    e2es = [r.e2e_s for r in good]
    if duration_s is not None:
        span_s: float | None = duration_s
    elif results:
        span_s = max(r.t_sent + r.e2e_s for r in results) - min(r.t_sent for r in results)
    else:
        span_s = None
    per_s = span_s if span_s is not None and span_s > 0 else None
    output_tokens = sum(r.n_out for r in good)
    return {
        "count": len(results),
        "ok": len(good),
        "failed": len(results) - len(good),
        **_stats("ttft", ttfts, ("mean", "p50", "p90", "p99", "max")),
        **_stats("tpot", tpots, ("mean", "p50", "p99")),
        **_stats("e2e", e2es, ("mean", "p99")),
        "output_tokens": output_tokens,
        "span_s": span_s,
        "output_tokens_per_s": output_tokens / per_s if per_s else None,
        "requests_per_s": len(good) / per_s if per_s else None,
    }


def summarize_by_model(results: Sequence[Result], duration_s: float | None = None) -> dict[str, dict[str, Any]]:
    """`summarize` for each model's results, keyed by model name (in order of first appearance)."""
    by_model: dict[str, list[Result]] = {}
    for result in results:
        by_model.setdefault(result.model, []).append(result)
    return {model: summarize(group, duration_s) for model, group in by_model.items()}
