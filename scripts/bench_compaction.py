#!/usr/bin/env python3
"""What a compaction round costs the vLLM scheduler (host backend, no GPU).

    python3 scripts/bench_compaction.py [--groups 2200] [--busy 320] [--requests 256] [--repeat 50]

An 8B model on an H200 has ~2,200 page groups of 32 blocks. ``--busy`` of them are mapped
and 60% full at random (a peak's churn); the round plans its moves (:func:`compaction.plan`)
and finds the moving blocks' owners among ``--requests`` running requests of 40 blocks each.
Also the round that finds nothing to gain (dense groups), which is what a steady engine pays.
Prints milliseconds per round; a round runs at most every ``compaction.INTERVAL_S``.
"""

from __future__ import annotations

import argparse
import random
import time
import types

from kvcached import _vmm
from kvcached.integrations.vllm import compaction
from kvcached.integrations.vllm.pages import FREE, USED, VllmPages

PAGE = 64 << 10  # small host pages: the bookkeeping, not the memory, is measured
BPP = 32


def per_round_ms(fn, repeat: int) -> float:
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t0) / repeat * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--groups", type=int, default=2200)
    ap.add_argument("--busy", type=int, default=320)
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=50)
    a = ap.parse_args()
    if not 1 <= a.busy < a.groups or a.requests * 40 > a.groups * BPP or a.repeat < 1:
        ap.error("need 1 <= --busy < --groups, --requests * 40 <= --groups * 32 and --repeat >= 1")
    backend = _vmm.HostBackend(2 * a.groups * PAGE + PAGE, PAGE)
    arena = _vmm.Arena(backend, 1, a.groups * PAGE, PAGE)
    pages = VllmPages(arena, num_blocks=a.groups * BPP, blocks_per_page=BPP, block_bytes=PAGE // BPP,
                      start_thread=False)
    rng = random.Random(0)
    busy = list(range(1, a.busy + 1))
    pages.ensure_mapped(busy)
    scattered = [b for p in busy for b in range(p * BPP, (p + 1) * BPP) if rng.random() < 0.6]
    pages.set_states(scattered, USED)
    pairs = compaction.plan(pages, lambda b: True)
    blocks = [types.SimpleNamespace(block_id=i) for i in range(a.groups * BPP)]
    req_to_blocks = {f"r{i}": blocks[i * 40:(i + 1) * 40] for i in range(a.requests)}
    wanted = {src for src, _ in pairs}
    plan_ms = per_round_ms(lambda: compaction.plan(pages, lambda b: True), a.repeat)
    owners_ms = per_round_ms(lambda: compaction._owners(req_to_blocks, wanted), a.repeat)
    pages.set_states(scattered, FREE)
    dense = [b for p in busy for b in range(p * BPP, (p + 1) * BPP)][:-40]
    pages.set_states(dense, USED)
    quiet_ms = per_round_ms(lambda: compaction.plan(pages, lambda b: True), a.repeat)
    pages.close()
    print(f"{a.busy} busy groups of {a.groups}, 60% full: plan {plan_ms:.2f} ms ({len(pairs)} moves), "
          f"owners among {a.requests} requests {owners_ms:.2f} ms; dense groups (nothing to gain): "
          f"{quiet_ms:.2f} ms; at most one round per {compaction.INTERVAL_S:g} s")


if __name__ == "__main__":
    main()
