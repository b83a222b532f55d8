#!/usr/bin/env python3
"""Does one process mapping or unmapping KV pages slow another process's kernels?

The serving benchmark's one open question at 10 req/s (BENCHMARKS.md): a burst of one
engine's requests was slower under kvcached while another engine unmapped its peak. This
measures the mechanism alone. A *victim* process runs the same matmul back to back,
synchronizing after each, and records each one's wall time; an *aggressor* process, with
kvcached's CUDA arena shaped like the 8B engine's (64 ranges of 2 MiB pages: one page
group is 128 MiB), first idles, then maps and unmaps ``--groups`` page groups in cycles.
Both stamp with CLOCK_MONOTONIC, so the victim's steps can be sorted by what the aggressor
was doing meanwhile: nothing (idle phase), between calls, mapping, or unmapping.
``--same-process`` runs the aggressor as a thread of the victim's process instead, as an
engine's own prefetch/trim thread is: one CUDA context for both.

    python3 scripts/gpu/vmm_interference.py [--seconds 4] [--groups 4] [--size 4096] [--same-process] [--json out.json]

Needs a GPU and kvcached built with its CUDA backend.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from typing import Any

RANGES, PAGE = 64, 2 << 20


def victim(t_end: float, size: int) -> list[tuple[float, float]]:
    import torch

    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    for _ in range(20):
        a @ b
    torch.cuda.synchronize()
    steps = []
    while (t := time.monotonic()) < t_end:
        a @ b
        torch.cuda.synchronize()
        steps.append((t, time.monotonic()))
    return steps


def aggressor(t_start: float, idle_s: float, active_s: float, groups: int) -> list[tuple[str, float, float]]:
    from kvcached import _vmm

    backend = _vmm.CudaBackend(0)
    arena = _vmm.Arena(backend, RANGES, 64 * PAGE, PAGE)
    ids = list(range(groups))
    arena.map(ids)  # first mapping creates the handles; not measured
    arena.unmap(ids)
    calls: list[tuple[str, float, float]] = []
    time.sleep(max(0.0, t_start + idle_s - time.monotonic()))
    while time.monotonic() < t_start + idle_s + active_s:
        for kind, call in (("map", arena.map), ("unmap", arena.unmap)):
            t = time.monotonic()
            call(ids)
            calls.append((kind, t, time.monotonic()))
            time.sleep(0.02)
    arena.close()
    return calls


def ms_stats(values: list[float]) -> dict[str, float | int]:
    if not values:
        return {"n": 0}
    s = sorted(values)
    return {
        "n": len(s),
        "p50_ms": round(1e3 * statistics.median(s), 3),
        "p99_ms": round(1e3 * s[int(0.99 * (len(s) - 1))], 3),
        "max_ms": round(1e3 * s[-1], 3),
    }


def classify(steps: list[tuple[float, float]], calls: list[tuple[str, float, float]], active_from: float) -> dict[str, Any]:
    """The victim's step times by what the aggressor did during the step."""
    by: dict[str, list[float]] = {"idle phase": [], "between calls": [], "during map": [], "during unmap": []}
    i = 0
    for start, end in steps:
        if end < active_from:
            by["idle phase"].append(end - start)
            continue
        while i < len(calls) and calls[i][2] < start:
            i += 1
        overlapping = {kind for kind, s, e in calls[i : i + 4] if s < end and e > start}
        key = "during unmap" if "unmap" in overlapping else "during map" if "map" in overlapping else "between calls"
        by[key].append(end - start)
    return {k: ms_stats(v) for k, v in by.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=4.0, help="length of the idle and of the active phase")
    ap.add_argument("--groups", type=int, default=4, help="page groups (128 MiB each) per map or unmap call")
    ap.add_argument("--size", type=int, default=4096, help="the victim's square bf16 matmul")
    ap.add_argument("--same-process", action="store_true", help="the aggressor is a thread of the victim's process")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--role", choices=["main", "victim", "aggressor"], default="main", help=argparse.SUPPRESS)
    ap.add_argument("--t0", type=float, default=0.0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.role == "victim":
        json.dump(victim(args.t0 + 2 * args.seconds, args.size), sys.stdout)
        return 0
    if args.role == "aggressor":
        json.dump(aggressor(args.t0, args.seconds, args.seconds, args.groups), sys.stdout)
        return 0
    if args.same_process:
        import threading

        import torch

        torch.zeros(1, device="cuda")  # the context exists before the thread's first driver call
        t0 = time.monotonic() + 5.0
        calls_out: list[tuple[str, float, float]] = []
        thread = threading.Thread(target=lambda: calls_out.extend(aggressor(t0, args.seconds, args.seconds, args.groups)))
        thread.start()
        time.sleep(max(0.0, t0 - time.monotonic()))
        steps = victim(t0 + 2 * args.seconds, args.size)
        thread.join()
        calls = calls_out
    else:
        t0 = time.monotonic() + 15.0  # both processes import torch / CUDA first
        common = [sys.executable, __file__, "--seconds", str(args.seconds), "--groups", str(args.groups),
                  "--size", str(args.size), "--t0", str(t0)]
        procs = [subprocess.Popen([*common, "--role", role], stdout=subprocess.PIPE, text=True) for role in ("victim", "aggressor")]
        outs = [p.communicate()[0] for p in procs]
        if any(p.returncode for p in procs):
            print("a process failed:", [p.returncode for p in procs], file=sys.stderr)
            return 1
        steps = [(s[0], s[1]) for s in json.loads(outs[0]) if s[0] >= t0]
        calls = [(c[0], c[1], c[2]) for c in json.loads(outs[1])]
    result = {
        "same_process": args.same_process,
        "groups_per_call": args.groups,
        "group_bytes": RANGES * PAGE,
        "victim_matmul": args.size,
        "victim_steps_ms": classify(steps, calls, t0 + args.seconds),
        "aggressor_calls_ms": {k: ms_stats([e - s for kind, s, e in calls if kind == k]) for k in ("map", "unmap")},
    }
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
