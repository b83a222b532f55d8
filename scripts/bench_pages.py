#!/usr/bin/env python3
"""Driver calls of the vLLM block pool under a steady request stream (host backend, no GPU).

vLLM's real ``BlockPool``, patched into kvcached's ``ElasticBlockPool``, is driven in real
time the way vLLM's scheduler drives it: Poisson arrivals, a prompt's blocks taken at
admission, one more block every ``block_size`` decoded tokens at a fixed step time, and on
finish the full blocks kept in the prefix cache and the rest freed. The page bookkeeping,
its prefetch/trim thread and the arena are kvcached's own; the arena sits on the host
backend with the page geometry of a Llama-3.1-8B-shaped engine on a GPU (64 blocks of 16
tokens per page group), scaled down in bytes.

First the Python cost of each call in a tight loop (vanilla ``BlockPool`` vs kvcached's).
Then it counts what costs time on a GPU: page groups mapped and unmapped per second (each is
64 ranges × ~30 µs of driver calls on an H200, BENCHMARKS.md) and **synchronous maps** —
those the scheduler waits for inside ``get_new_blocks`` because the prefetch had not
mapped the page ahead — per request. Run it where vLLM is installed (the CI's vLLM env):

    python scripts/bench_pages.py --rates 2,8 --seconds 20 [--json out.json]
    KVCACHED_PACK=on python scripts/bench_pages.py --rates 30 --lengths sharegpt   # as on a shared GPU
    KVCACHED_PACK=on python scripts/bench_pages.py --peak 20 --step-ms 20      # memory back after a peak
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from kvcached.units import parse_size

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_serving"))
from workload import LENGTH_KINDS, lengths

BLOCK_TOKENS = 16


@dataclass
class Request:
    total_tokens: int
    tokens: int
    rid: str = ""
    blocks: list[Any] = field(default_factory=list)


GPU_GROUP_BYTES = 128 << 20  # one page group of the 8B on a GPU: 64 ranges x 2 MiB
HOST_PAGE = 64 << 10


def make_pool(num_blocks: int, blocks_per_page: int, vanilla: bool) -> Any:
    """vLLM's BlockPool (``vanilla``) or kvcached's ``ElasticBlockPool`` over a host arena
    of page groups holding ``blocks_per_page`` blocks (two ranges of 64 KiB pages)."""
    from vllm.v1.core import block_pool

    from kvcached import _vmm
    from kvcached.integrations import vllm as kv_vllm
    from kvcached.integrations.vllm import runtime
    from kvcached.integrations.vllm.block_pool import ElasticBlockPool

    if vanilla:
        return ElasticBlockPool.__mro__[1](num_gpu_blocks=num_blocks, enable_caching=True, hash_block_size=BLOCK_TOKENS)
    kv_vllm.patch_block_pool_module(block_pool)
    num_pages = -(-num_blocks // blocks_per_page)
    # The cap only bounds what may be created; it sits above the control plane's 1 GiB headroom.
    backend = _vmm.HostBackend((2 << 30) + 2 * (num_pages + 1) * HOST_PAGE, HOST_PAGE)
    arena = _vmm.Arena(backend, 2, num_pages * HOST_PAGE, HOST_PAGE)
    runtime.register_worker_kv(
        runtime.WorkerKV(arena, backend, num_blocks, blocks_per_page, 2 * HOST_PAGE // blocks_per_page, "bench")
    )
    return ElasticBlockPool(num_gpu_blocks=num_blocks, enable_caching=True, hash_block_size=BLOCK_TOKENS)


def cache(pool: Any, blocks: list[Any], serial: itertools.count[int]) -> None:
    from vllm.v1.core.kv_cache_utils import make_block_hash_with_group_id

    for block in blocks:
        key = make_block_hash_with_group_id(next(serial).to_bytes(32, "big"), 0)
        block.set_block_hash(key)
        pool.cached_block_hash_to_block.insert(key, block)


def poisson(rate: float, seconds: float, seed: int) -> list[float]:
    """Arrival times (s) of a Poisson stream of ``rate`` req/s over ``seconds``."""
    rng, t = random.Random(seed), 0.0
    out: list[float] = []
    while True:
        t += rng.expovariate(rate)
        if t >= seconds:
            return out
        out.append(t)


def run(pool: Any, send_times: list[float], kind: str, step_s: float, seed: int) -> dict[str, Any]:
    """Drive ``pool`` with requests arriving at ``send_times`` (s from the start) until all
    have finished; counts, per-call costs, and a sample of the pages after every step."""
    from kvcached.integrations.vllm import compaction, placement

    kv = getattr(pool, "kv", None)
    serial = itertools.count(seed << 40)

    def counts() -> tuple[int, int, int]:
        if kv is None:
            return 0, 0, 0
        stats = kv.stats()
        return stats.num_pages_mapped_total, stats.num_pages_unmapped_total, stats.num_sync_maps

    before = counts()
    running: list[Request] = []
    take_us: list[float] = []
    mapped, used, cached, timeline = [], [], [], []
    sizes = iter(lengths(kind, len(send_times), seed))
    arrivals = iter(send_times)
    t0 = time.monotonic()
    next_arrival = t0 + next(arrivals, float("inf"))
    next_step = t0
    admitted = finished = moved = 0

    def take(n: int, held: list[Any]) -> list[Any]:
        t = time.perf_counter()
        pool.req_to_blocks, pool.allocating_for = {"r": held}, "r"  # as the patched allocate_slots does
        blocks = pool.get_new_blocks(n)
        take_us.append((time.perf_counter() - t) * 1e6)
        return blocks

    while True:
        now = time.monotonic()
        if next_arrival == float("inf") and not running:
            break
        while next_arrival <= now:
            prompt, output = next(sizes)
            req = Request(prompt + output, prompt, f"r{admitted}")
            req.blocks = take(-(-(prompt + 1) // BLOCK_TOKENS), [])
            running.append(req)
            admitted += 1
            next_arrival = t0 + next(arrivals, float("inf"))
        if now >= next_step:
            next_step += step_s
            still = []
            for req in running:
                req.tokens += 1
                if req.tokens >= req.total_tokens:
                    full = req.tokens // BLOCK_TOKENS
                    cache(pool, req.blocks[:full], serial)
                    pool.free_blocks(reversed(req.blocks))
                    finished += 1
                    continue
                if req.tokens % BLOCK_TOKENS == 0:
                    req.blocks += take(1, req.blocks)
                still.append(req)
            running = still
            if kv is not None:
                # Compaction as the scheduler patch runs it (KVCACHED_COMPACT); no bytes to copy here.
                with kv.lock:
                    moves = compaction.compact(pool, {r.rid: r.blocks for r in running})
                if moves is not None:
                    moves.copied(None)
                    moved += len(moves.pairs)
                stats = kv.stats()
                mapped.append(stats.mapped_bytes / kv.group_bytes)
                used.append(stats.used_bytes / kv.group_bytes)
                cached.append(stats.cached_bytes / kv.group_bytes)
                timeline.append((round(now - t0, 3), len(running), mapped[-1], used[-1], cached[-1]))
        time.sleep(max(0.0, min(next_step, next_arrival) - time.monotonic()))
    elapsed = time.monotonic() - t0
    maps, unmaps, sync = (b - a for a, b in zip(before, counts(), strict=True))
    return {
        "pool": "kvcached" if kv is not None else "vanilla",
        "rate": round(len(send_times) / max(send_times[-1], 1e-9), 2) if send_times else 0.0,  # mean
        "lengths": kind,
        "pack": placement.packs(pool.kv) if kv is not None else None,
        "seconds": round(elapsed, 1),
        "requests": finished,
        "get_new_blocks_us_p50": round(statistics.median(take_us), 1),
        "get_new_blocks_us_p99": round(sorted(take_us)[int(0.99 * (len(take_us) - 1))], 1),
        "maps_per_s": round(maps / elapsed, 2),
        "unmaps_per_s": round(unmaps / elapsed, 2),
        "sync_maps_per_request": round(sync / max(1, finished), 3),
        "compact": compaction.enabled(pool.kv) if kv is not None else None,
        "moved_blocks": moved,
        "mapped_groups_mean": round(statistics.mean(mapped), 2) if mapped else None,
        "used_groups_mean": round(statistics.mean(used), 2) if used else None,
        "cached_groups_mean": round(statistics.mean(cached), 2) if cached else None,
        "mapped_groups_max": round(max(mapped), 2) if mapped else None,
        "timeline": timeline,
    }


def call_cost(pool: Any, calls: int) -> dict[str, Any]:
    """Microseconds per ``get_new_blocks(1)`` and ``free_blocks`` in a tight steady loop
    (200 live blocks, two in three freed ones cached): the Python each call adds."""
    serial = itertools.count(1 << 60)
    held = [pool.get_new_blocks(1) for _ in range(200)]
    take = give = 0.0
    for i in range(calls):
        t = time.perf_counter()
        held.append(pool.get_new_blocks(1))
        t1 = time.perf_counter()
        blocks = held.pop(0)
        if i % 3:
            cache(pool, blocks, serial)
        t2 = time.perf_counter()
        pool.free_blocks(blocks)
        t3 = time.perf_counter()
        take, give = take + t1 - t, give + t3 - t2
    for blocks in held:
        pool.free_blocks(blocks)
    name = "kvcached" if hasattr(pool, "kv") else "vanilla"
    return {"pool": name, "calls": calls, "get_new_blocks_us": round(take / calls * 1e6, 2), "free_blocks_us": round(give / calls * 1e6, 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", default="2,8", help="request rates (req/s), comma separated")
    ap.add_argument("--seconds", type=float, default=20.0, help="arrivals per rate (then the running ones finish)")
    ap.add_argument("--lengths", choices=LENGTH_KINDS, default="fixed", help="fixed 256 + 256, or ShareGPT-like")
    ap.add_argument("--step-ms", type=float, default=6.0, help="decode step (TPOT of the 8B on an H200: ~6 ms)")
    ap.add_argument("--blocks-per-page", type=int, default=64, help="8B on a GPU: 2 MiB pages / 32 KiB per block")
    ap.add_argument("--num-blocks", type=int, default=64 * 256)
    ap.add_argument("--calls", type=int, default=20000, help="calls of the tight-loop cost measurement")
    ap.add_argument("--idle-cache-max", default="256MiB", help="KVCACHED_IDLE_CACHE_MAX as on the GPU (scaled here)")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--peak", type=float, help="instead: one engine's peak at this rate over a 1 req/s base "
                    "(the serving benchmark's shape); prints how long mapped memory lags the drain")
    ap.add_argument("--repeat", type=int, default=3, help="--peak: runs, each with its own seed")
    args = ap.parse_args()
    os.environ.setdefault("KVCACHED_REQUIRE_CONTROL", "0")
    # Byte sizes scale with the page group: 256 MiB of cold cache on the GPU is 2 groups.
    scale = GPU_GROUP_BYTES // (2 * HOST_PAGE)
    os.environ.setdefault("KVCACHED_IDLE_CACHE_MAX", str(parse_size(args.idle_cache_max) // scale))
    env = {k: v for k, v in os.environ.items() if k.startswith("KVCACHED_")}
    results = peak_runs(args) if args.peak is not None else steady_runs(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "env": env, "results": results}, f, indent=1)
    return 0


def steady_runs(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Per pool: the tight-loop cost, then a steady Poisson load at each rate."""
    results = []
    for vanilla in (True, False):
        pool = make_pool(args.num_blocks, args.blocks_per_page, vanilla)
        res = call_cost(pool, args.calls)
        results.append(res)
        print(json.dumps(res), flush=True)
        time.sleep(2)  # the loop's pages go back before the timed loads
        for i, rate in enumerate(float(r) for r in args.rates.split(",")):
            res = run(pool, poisson(rate, args.seconds, i + 1), args.lengths, args.step_ms / 1000, seed=i + 1)
            res.pop("timeline")
            res["rate"] = rate  # the nominal rate (the run's own is its Poisson draw)
            results.append(res)
            print(json.dumps(res), flush=True)
            time.sleep(2)  # let the idle trim settle between loads
    return results


def peak_runs(args: argparse.Namespace) -> list[dict[str, Any]]:
    """kvcached's pool through a peak (1 req/s, up to ``--peak`` and back), ``--repeat``
    times: how long after the load falls back the mapped memory does too."""
    from workload import StaggeredPeaks, arrivals

    shape = StaggeredPeaks(["m"], peak_rps=args.peak, base_rps=1.0, lead_s=10.0, ramp_s=3.0, hold_s=8.0, tail_s=15.0)
    pool = make_pool(args.num_blocks, args.blocks_per_page, vanilla=False)
    results = []
    for seed in range(1, args.repeat + 1):
        res = run(pool, [t for t, _ in arrivals(shape, seed)], args.lengths, args.step_ms / 1000, seed=seed)
        res.update(memory_lag(res.pop("timeline"), shape.peak_window("m")))
        results.append(res)
        print(json.dumps(res), flush=True)
        time.sleep(2)
    return results


def memory_lag(timeline: list[tuple[float, int, float, float, float]], window: tuple[float, float]) -> dict[str, Any]:
    """The serving report's rule (``report.memory_return``) on one engine's samples
    (t, running, mapped / used / cached page groups), its groups counted at their GPU
    size; and what was mapped, used and cached (groups' worth) at the drain and 1 s later:
    memory that stays mapped while used is the requests', not a lag of kvcached's."""
    from report import memory_return, state_at

    g = GPU_GROUP_BYTES
    samples = [
        {"t": t, "engines": {"m": {"num_requests_running": r, "num_requests_waiting": 0,
                                   "mapped": m * g, "used": u * g, "cached": c * g}}}
        for t, r, m, u, c in timeline
    ]
    run = {"peak_windows": {"m": window}, "samples": samples}
    (lag,) = memory_return(run)
    lag.pop("engine")
    lag.pop("after_1s")  # in groups below, with the drain's own
    for name, offset in (("at_drain", 0.0), ("drain_plus_1s", 1.0)):
        state = None if lag["t_drain"] is None else state_at(run, "m", lag["t_drain"] + offset)
        if state is not None:
            lag[name] = {"running": int(state["num_requests_running"]),
                         **{k: round(state[k] / g, 1) for k in ("mapped", "used", "cached")}}
    return lag


if __name__ == "__main__":
    sys.exit(main())
