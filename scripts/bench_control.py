"""Control-plane latencies on the host backend, with real engine processes.

    python scripts/bench_control.py [--trials 100] [--engines 4] [--json]

Measures, as p50 / p99 / max over ``--trials``:

- ``limit -> applied``: ``Controller.set_limit`` on one of ``--engines`` idle engines until
  the engine publishes the applied revision (its pool has unmapped down to the limit).
- ``limit -> B maps``: the GPU budget is full, engine A holds it with evictable (cached)
  blocks and engine B is refused; ``set_limit`` lowers A, and we time until B's allocation
  succeeds (A's watcher evicts and unmaps, B's retry is admitted).
- ``A frees -> B maps``: the same, but A simply frees its blocks and the memory goes back
  through A's reserve trimming (``--trim-idle-s``, the pool's ``KVCACHED_TRIM_IDLE_S``).

Engines are ``PagePool`` over a real ``kvcached._vmm.Arena`` on the host backend (no torch,
so processes start fast). B retries its allocation every ``--retry-ms`` as a scheduler would.
Timestamps are CLOCK_MONOTONIC, shared by all processes on the host.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
import uuid
from typing import Any

PAGE_BYTES = 2 << 20
BLOCKS_PER_PAGE = 16
ctx = mp.get_context("spawn")


def _engine(conn: Any, shm_name: str, name: str, num_pages: int, trim_idle_s: float, retry_s: float) -> None:
    """An engine process: a host pool attached to the segment, driven by commands on ``conn``."""
    from kvcached import _vmm
    from kvcached.control import attach_engine
    from kvcached.pool import PagePool, ReserveConfig

    backend = _vmm.HostBackend(num_pages * PAGE_BYTES)
    arena = _vmm.Arena(backend, 1, num_pages * PAGE_BYTES, PAGE_BYTES)
    reserve = ReserveConfig(min_pages=0, max_pages=2, trim_idle_s=trim_idle_s)
    pool = PagePool(
        arena,
        num_pages=num_pages,
        blocks_per_page=BLOCKS_PER_PAGE,
        block_bytes=PAGE_BYTES // BLOCKS_PER_PAGE,
        num_pinned_blocks=0,
        reserve=reserve,
    )
    handle = attach_engine(
        pool, name, "bench", "other", shm_name, arena=arena, backend=backend, headroom_bytes=0, limit_bytes=None
    )
    held: list[list[int]] = []
    conn.send("ready")
    while True:
        cmd, arg = conn.recv()
        if cmd == "stop":
            break
        if cmd == "hold":  # allocate `arg` pages of used blocks, retrying until admitted
            ids = None
            while ids is None:
                ids = pool.alloc(arg * BLOCKS_PER_PAGE)
                if ids is None:
                    time.sleep(retry_s)
            held.append(ids)
            conn.send(None)
        elif cmd == "cache":  # turn the newest holding into evictable cached blocks
            pool.cache(held.pop())
            conn.send(None)
        elif cmd == "free":  # free the newest holding; report when
            ids = held.pop()
            t0 = time.monotonic_ns()
            pool.free(ids)
            conn.send(t0)
        elif cmd == "want":  # retry an allocation until admitted; report when
            ids = None
            conn.send("spinning")
            while ids is None:
                ids = pool.alloc(arg * BLOCKS_PER_PAGE)
                if ids is None:
                    time.sleep(retry_s)
            t1 = time.monotonic_ns()
            held.append(ids)
            conn.send(t1)
        elif cmd == "release":  # free everything and unmap it now
            for ids in held:
                pool.free(ids)
            held.clear()
            pool.evict(pool.num_cached_blocks)
            pool.set_limit_bytes(0)
            pool.set_limit_bytes(None)
            conn.send(None)
    handle.close()
    pool.close()
    arena.close()


class Engine:
    def __init__(self, shm_name: str, name: str, num_pages: int, trim_idle_s: float, retry_s: float) -> None:
        self.name = name
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(
            target=_engine, args=(child, shm_name, name, num_pages, trim_idle_s, retry_s), daemon=True
        )
        self.proc.start()

    def ready(self) -> None:
        assert self.conn.recv() == "ready"

    def call(self, cmd: str, arg: int = 0) -> Any:
        self.conn.send((cmd, arg))
        return self.conn.recv()

    def stop(self) -> None:
        self.conn.send(("stop", 0))
        self.proc.join(10)


def _summary(samples_s: list[float]) -> dict[str, float]:
    ms = sorted(s * 1e3 for s in samples_s)
    p99 = ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))]
    return {"n": len(ms), "p50_ms": statistics.median(ms), "p99_ms": p99, "max_ms": ms[-1]}


def bench_limit_apply(ctl: Any, shm_name: str, args: argparse.Namespace) -> list[float]:
    engines = [Engine(shm_name, f"idle{i}", 16, args.trim_idle_s, args.retry_ms / 1e3) for i in range(args.engines)]
    for e in engines:
        e.ready()
    for e in engines:
        e.call("hold", 2)
        e.call("hold", 2)
        e.call("cache", 0)  # 2 used + 2 cached pages: a lower limit has real work to do
    samples = []
    for trial in range(args.trials):
        e = engines[trial % len(engines)]
        limit = (2 if (trial // len(engines)) % 2 == 0 else 4) * PAGE_BYTES
        t0 = time.monotonic()
        revision = ctl.set_limit(e.name, limit)
        if not ctl.wait_applied(e.name, revision, timeout_s=5):
            raise RuntimeError(f"{e.name} did not apply revision {revision}")
        samples.append(time.monotonic() - t0)
        if limit == 4 * PAGE_BYTES:
            e.call("release")
            e.call("hold", 2)
            e.call("hold", 2)
            e.call("cache", 0)
    for e in engines:
        e.stop()
    return samples


def bench_handoff(ctl: Any, shm_name: str, args: argparse.Namespace, via_limit: bool) -> list[float]:
    budget_pages, moved_pages = 8, 2
    a = Engine(shm_name, "A", 16, args.trim_idle_s, args.retry_ms / 1e3)
    b = Engine(shm_name, "B", 16, args.trim_idle_s, args.retry_ms / 1e3)
    a.ready()
    b.ready()
    ctl.set_budget(0, budget_pages * PAGE_BYTES)
    samples = []
    for _ in range(args.trials):
        a.call("hold", budget_pages - moved_pages)
        a.call("hold", moved_pages)
        if via_limit:
            a.call("cache", 0)
        b.conn.send(("want", moved_pages))
        assert b.conn.recv() == "spinning"
        time.sleep(0.005)  # B is refused at least once: the budget is full
        if via_limit:
            t0 = time.monotonic_ns()
            ctl.set_limit("A", (budget_pages - moved_pages) * PAGE_BYTES)
        else:
            t0 = a.call("free")
        t1 = b.conn.recv()
        samples.append((t1 - t0) / 1e9)
        b.call("release")
        a.call("release")
        if via_limit:
            ctl.wait_applied("A", ctl.set_limit("A", None), timeout_s=5)
    ctl.set_budget(0, None)
    a.stop()
    b.stop()
    return samples


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--engines", type=int, default=4)
    parser.add_argument("--retry-ms", type=float, default=1.0, help="how often a refused engine retries")
    parser.add_argument("--trim-idle-s", type=float, default=0.05, help="the pools' reserve trim delay")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from kvcached import envs
    from kvcached.control import Controller

    shm_name = f"kvcached-bench-{uuid.uuid4().hex[:12]}"
    os.environ["KVCACHED_SHM_NAME"] = shm_name  # for the engine processes too
    ctl = Controller.open(shm_name, create=True)
    try:
        rows = {
            "limit -> applied": _summary(bench_limit_apply(ctl, shm_name, args)),
            "limit -> B maps": _summary(bench_handoff(ctl, shm_name, args, via_limit=True)),
            "A frees -> B maps": _summary(bench_handoff(ctl, shm_name, args, via_limit=False)),
        }
    finally:
        ctl.close()
        Controller.unlink(shm_name)
    config = {
        "watch_interval_s": envs.get("KVCACHED_WATCH_INTERVAL_S"),
        "trim_idle_s": args.trim_idle_s,
        "retry_ms": args.retry_ms,
        "engines": args.engines,
        "cpus": os.cpu_count(),
    }
    if args.json:
        json.dump({"config": config, "results": rows}, sys.stdout, indent=2)
        print()
        return 0
    print(", ".join(f"{k}={v}" for k, v in config.items()))
    print(f"{'path':<20} {'n':>5} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    for path, row in rows.items():
        print(f"{path:<20} {row['n']:>5} {row['p50_ms']:>8.2f} {row['p99_ms']:>8.2f} {row['max_ms']:>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
