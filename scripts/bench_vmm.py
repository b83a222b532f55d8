#!/usr/bin/env python3
"""Arena map/unmap against the raw backend calls, in one process.

For each page size: the per-call p50/p99 of
  * raw (timed in C++, no Python): create, map, set_access, unmap, release;
  * arena.map([p]) (= create + map + set_access) and arena.unmap([p]) (= unmap + release),
    called from Python as the pool calls them;
and the ratio arena / raw for map+access and unmap+release. Also a batch of 32
adjacent pages, where the arena grants access once for the run, and a probe of
whether one unmap may span several mappings.

    python scripts/bench_vmm.py --device cuda --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time

from kvcached import _vmm, vmm

MiB = 1 << 20


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def time_arena(backend: _vmm.Backend, page_bytes: int, iterations: int, cycle: int = 4) -> dict[str, list[float]]:
    """Map and unmap one page at a time, cycling over ``cycle`` addresses (1: the same
    address every time, as the raw loop does)."""
    arena = vmm.Arena(backend, 1, 4 * page_bytes, page_bytes)
    out: dict[str, list[float]] = {"map": [], "unmap": []}
    for i in range(iterations):
        p = [i % cycle]
        t0 = time.perf_counter_ns()
        arena.map(p)
        t1 = time.perf_counter_ns()
        arena.unmap(p)
        t2 = time.perf_counter_ns()
        out["map"].append(t1 - t0)
        out["unmap"].append(t2 - t1)
    arena.close()
    return out


def time_batch(backend: _vmm.Backend, page_bytes: int, batch: int, iterations: int) -> dict[str, list[float]]:
    arena = vmm.Arena(backend, 1, batch * page_bytes, page_bytes)
    ids = list(range(batch))
    out: dict[str, list[float]] = {"map": [], "unmap": []}
    for _ in range(iterations):
        t0 = time.perf_counter_ns()
        arena.map(ids)
        t1 = time.perf_counter_ns()
        arena.unmap(ids)
        t2 = time.perf_counter_ns()
        out["map"].append((t1 - t0) / batch)
        out["unmap"].append((t2 - t1) / batch)
    arena.close()
    return out


def probe_spanning_unmap(backend: _vmm.Backend, page_bytes: int) -> str:
    """Can one unmap call cover several adjacent mappings? (Decides batching unmap.)"""
    addr = backend.reserve(4 * page_bytes)
    handles = [backend.create(page_bytes) for _ in range(4)]
    for i, h in enumerate(handles):
        backend.map(addr + i * page_bytes, page_bytes, h, 0)
    backend.set_access(addr, 4 * page_bytes)
    try:
        backend.unmap(addr, 4 * page_bytes)
        verdict = "yes"
    except _vmm.VmmError as exc:
        verdict = f"no ({exc})"
        for i in range(4):
            backend.unmap(addr + i * page_bytes, page_bytes)
    for h in handles:
        backend.release(h)
    backend.free_reserved(addr, 4 * page_bytes)
    return verdict


def probe_reservation_size(backend: _vmm.Backend, page_bytes: int, iterations: int = 200) -> dict[str, float]:
    """Raw create+map+access+unmap+release of one page, in a reservation of one page
    vs of four pages: does the size of the surrounding reservation change the cost?"""
    out = {}
    for pages in (1, 4):
        addr = backend.reserve(pages * page_bytes, page_bytes & (~page_bytes + 1))
        times = []
        for _ in range(iterations):
            t0 = time.perf_counter_ns()
            h = backend.create(page_bytes)
            backend.map(addr, page_bytes, h, 0)
            backend.set_access(addr, page_bytes)
            backend.unmap(addr, page_bytes)
            backend.release(h)
            times.append(time.perf_counter_ns() - t0)
        backend.free_reserved(addr, pages * page_bytes)
        out[f"reservation_{pages}_pages_us"] = statistics.median(times) / 1e3
    return out


def device_facts(backend: _vmm.Backend) -> dict[str, str]:
    facts = {"backend": backend.name, "host": platform.node(), "date": time.strftime("%Y-%m-%d")}
    if backend.name == "cuda":
        facts["card"] = backend.device_name
        facts["driver_api"] = str(backend.driver_version)
        try:
            facts["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, check=False,
            ).stdout.strip().splitlines()[0]
        except (OSError, IndexError):
            facts["driver"] = "unknown"
    try:
        facts["commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        facts["commit"] = "unknown"
    return facts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "host"], default="cuda")
    parser.add_argument("--sizes-mib", default="2,8,32,128")
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--json", help="write all figures here")
    args = parser.parse_args()

    sizes = [int(s) * MiB for s in args.sizes_mib.split(",")]
    backend = vmm.make_backend(args.device, host_cap_bytes=2 * max(sizes) * 40)
    results: dict[str, object] = {"facts": device_facts(backend), "sizes": {}}
    print(" ".join(f"{k}={v}" for k, v in results["facts"].items()))  # type: ignore[union-attr]
    rows = []
    for size in sizes:
        iters = args.iterations
        # Warm-up so first-touch and lazy driver set-up stay out of the figures.
        _vmm.bench_raw(backend, size, 5)
        time_arena(backend, size, 5)
        raw = _vmm.bench_raw(backend, size, iters)
        arena = time_arena(backend, size, iters)
        raw_map = [c + m + a for c, m, a in zip(raw["create"], raw["map"], raw["set_access"], strict=True)]
        raw_unmap = [u + r for u, r in zip(raw["unmap"], raw["release"], strict=True)]
        entry = {
            "raw_p50_us": {k: statistics.median(v) / 1e3 for k, v in raw.items()},
            "raw_map_access_p50_us": statistics.median(raw_map) / 1e3,
            "raw_map_access_p99_us": pct(raw_map, 0.99) / 1e3,
            "raw_unmap_release_p50_us": statistics.median(raw_unmap) / 1e3,
            "raw_unmap_release_p99_us": pct(raw_unmap, 0.99) / 1e3,
            "arena_map_p50_us": statistics.median(arena["map"]) / 1e3,
            "arena_map_p99_us": pct(arena["map"], 0.99) / 1e3,
            "arena_unmap_p50_us": statistics.median(arena["unmap"]) / 1e3,
            "arena_unmap_p99_us": pct(arena["unmap"], 0.99) / 1e3,
        }
        entry["map_ratio"] = entry["arena_map_p50_us"] / entry["raw_map_access_p50_us"]
        entry["unmap_ratio"] = entry["arena_unmap_p50_us"] / entry["raw_unmap_release_p50_us"]
        entry["map_gbps"] = size / (entry["arena_map_p50_us"] * 1e3)
        entry["create_release_share"] = (entry["raw_p50_us"]["create"] + entry["raw_p50_us"]["release"]) / (
            entry["raw_map_access_p50_us"] + entry["raw_unmap_release_p50_us"]
        )
        same = time_arena(backend, size, iters, cycle=1)
        entry["same_addr_map_ratio"] = statistics.median(same["map"]) / 1e3 / entry["raw_map_access_p50_us"]
        entry["same_addr_unmap_ratio"] = statistics.median(same["unmap"]) / 1e3 / entry["raw_unmap_release_p50_us"]
        batch = time_batch(backend, size, 32 if size <= 32 * MiB else 8, max(10, iters // 20))
        entry["batch_map_per_page_p50_us"] = statistics.median(batch["map"]) / 1e3
        entry["batch_unmap_per_page_p50_us"] = statistics.median(batch["unmap"]) / 1e3
        results["sizes"][str(size // MiB)] = entry  # type: ignore[index]
        rows.append((size // MiB, entry))

    results["spanning_unmap"] = probe_spanning_unmap(backend, sizes[0])
    results["reservation_probe"] = {str(s // MiB): probe_reservation_size(backend, s) for s in sizes}
    print("full cycle of one page, p50 µs, in a reservation of 1 page vs 4 pages:",
          {k: (round(v["reservation_1_pages_us"], 1), round(v["reservation_4_pages_us"], 1))
           for k, v in results["reservation_probe"].items()})
    print()
    print("| page | raw create | raw map | raw set-access | raw unmap | raw release "
          "| arena map+access p50/p99 | raw p50 | ratio | arena unmap+release p50/p99 | raw p50 | ratio "
          "| map GB/s | batch map/page | batch unmap/page | same-address ratios map / unmap |")
    print("|" + "---|" * 17)
    for mib, e in rows:
        r = e["raw_p50_us"]
        print(
            f"| {mib} MiB | {r['create']:.1f} | {r['map']:.1f} | {r['set_access']:.1f} | {r['unmap']:.1f} | {r['release']:.1f} "
            f"| {e['arena_map_p50_us']:.1f} / {e['arena_map_p99_us']:.1f} | {e['raw_map_access_p50_us']:.1f} | {e['map_ratio']:.2f}x "
            f"| {e['arena_unmap_p50_us']:.1f} / {e['arena_unmap_p99_us']:.1f} | {e['raw_unmap_release_p50_us']:.1f} | {e['unmap_ratio']:.2f}x "
            f"| {e['map_gbps']:.0f} | {e['batch_map_per_page_p50_us']:.1f} | {e['batch_unmap_per_page_p50_us']:.1f} "
            f"| {e['same_addr_map_ratio']:.2f}x / {e['same_addr_unmap_ratio']:.2f}x |"
        )
    print(f"\n(all times µs per call; one unmap spanning several mappings: {results['spanning_unmap']})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
