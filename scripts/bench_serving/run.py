#!/usr/bin/env python3
"""Serving benchmark on one GPU: vLLM servers with static KV slices vs kvcached.

Run on the GPU machine after ``scripts/gpu/stage_vllm.sh`` (vLLM in /tmp/site) and
``pip install --no-build-isolation --no-deps .`` (kvcached with its import hook):

    export PYTHONPATH=/tmp/site
    python3 scripts/gpu/make_model.py /tmp/llama8b
    # three engines under staggered peaks, one configuration per call:
    python3 scripts/bench_serving/run.py multi --config static --model /tmp/llama8b --out $OUT
    python3 scripts/bench_serving/run.py multi --config kvcached --model /tmp/llama8b --out $OUT
    # after the 10 req/s run: it again with the GPU budget lifted, then again with it
    python3 scripts/bench_serving/run.py multi --config kvcached --again 10 --without-budget 10 ...
    # one engine, vanilla vLLM vs vLLM with kvcached, low / medium / saturating load:
    python3 scripts/bench_serving/run.py overhead --model /tmp/llama8b --out $OUT
    # the same, both servers up at once and the loads alternated between them, repeated:
    python3 scripts/bench_serving/run.py overhead --paired --repeat 3 --loads low:2:20,medium:8:20 \
        --model /tmp/llama8b --out $OUT

``static`` starts each engine with ``--kv-cache-memory-bytes`` = budget / engines (a
fixed slice, as users co-locate vLLM today). ``kvcached`` starts the same engines under
``kvctl launch``: each sees a virtual KV cache of the whole budget, the control plane
caps what all of them map together at the budget (``Controller.set_budget``), and each
engine's own limit leaves every peer a floor (``--floor``), so a peak can take the
memory of idle engines but never starve their base load.

Every run writes its requests, summaries and a memory/queue time series (0.25 s) into
one JSON per call (``$OUT/serving_<kind>.json``); ``report.py`` turns those into the
tables and plots of BENCHMARKS.md. ``--deadline-s`` skips runs that would not finish
inside a device call. The servers' processes are ``servers.py``'s; what is read from
them while a run goes, ``engine_metrics.py``'s.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from client import run_in_processes, summarize, summarize_by_model
from engine_metrics import Sampler, engines_idle, timing_means, timing_totals
from servers import Server, base_env, serve_cmd, start_server, stop_servers, wait_healthy, warm_up
from workload import ConstantRate, StaggeredPeaks, build_requests

GiB = 1 << 30

@dataclass
class Bench:
    args: argparse.Namespace
    env: dict[str, str]
    shm_name: str | None = None
    servers: list[Server] = field(default_factory=list)
    runs: list[dict[str, Any]] = field(default_factory=list)
    t_start: float = field(default_factory=time.time)
    startup_s: float | None = None  # multi: until all engines answered /health


# -- one run --------------------------------------------------------------------------------


def run_one(bench: Bench, label: str, schedule: Any, kind: str, seed: int, send_to: str | None = None) -> None:
    """Run ``schedule``'s requests against the servers (all to ``send_to`` if given: the
    same arrivals and prompts whichever server gets them) and record the run."""
    requests = build_requests(schedule, kind=kind, seed=seed)
    if send_to is not None:
        requests = [dataclasses.replace(r, model=send_to) for r in requests]
    urls = {s.name: s.url for s in bench.servers}
    t0 = time.time() + 2.0
    sampler = Sampler(bench.servers, bench.shm_name)
    timing_before = timing_totals(bench.servers)
    sampler.start(t0)
    results = run_in_processes(requests, urls, t0=t0, timeout_s=600)
    deadline = time.time() + 20
    while time.time() < deadline and not engines_idle(bench.servers):
        time.sleep(0.25)
    time.sleep(2.0)  # memory after the last request: does it go back?
    samples = sampler.stop()
    timing = timing_means(timing_before, timing_totals(bench.servers))
    summary = summarize(results)
    run = {
        "label": label,
        "kind": kind,
        "seed": seed,
        "schedule": schedule.describe(),
        "num_requests": len(requests),
        "summary": summary,
        "by_model": summarize_by_model(results),
        "results": [r.to_dict() for r in results],
        "samples": samples,
        "engine_timing": timing,
    }
    if hasattr(schedule, "peak_window"):
        run["peak_windows"] = {m: schedule.peak_window(m) for m in schedule.models}
    bench.runs.append(run)
    print(
        f"[{label}] {summary['ok']}/{summary['count']} ok, TTFT mean {(summary['ttft_mean_s'] or 0) * 1e3:.0f} ms "
        f"p99 {(summary['ttft_p99_s'] or 0) * 1e3:.0f} ms, TPOT mean {(summary['tpot_mean_s'] or 0) * 1e3:.1f} ms, "
        f"{summary['output_tokens_per_s'] or 0:.0f} tok/s",
        flush=True,
    )
    save(bench)


def fits(bench: Bench, seconds: float) -> bool:
    left = bench.args.deadline_s - (time.time() - bench.t_start)
    if seconds + 25 > left:  # to stop the servers and write the results
        print(f"skipping: {seconds:.0f} s run, {left:.0f} s left before the deadline", flush=True)
        return False
    return True


def save(bench: Bench) -> None:
    out = {"meta": meta(bench), "runs": bench.runs}
    tmp = os.path.join(bench.args.out, f"serving_{bench.args.kind}.json.tmp")
    with open(tmp, "w") as f:
        json.dump(out, f)
    os.replace(tmp, tmp[:-4])


def meta(bench: Bench) -> dict[str, Any]:
    m: dict[str, Any] = {"argv": sys.argv, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "config": bench.args.kind}
    try:
        q = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        m["gpu"] = q.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        m["gpu"] = None
    try:
        import vllm

        m["vllm"] = vllm.__version__
    except ImportError:
        m["vllm"] = None
    m["commit"] = os.environ.get("KVCACHED_COMMIT", "")
    m["kvcached_env"] = {k: v for k, v in sorted(os.environ.items()) if k.startswith("KVCACHED_") and k != "KVCACHED_COMMIT"}
    m["budget_bytes"], m["floor_bytes"] = bench.args.budget_bytes, bench.args.floor_bytes
    m["startup_s"] = bench.startup_s
    return m


# -- the two kinds of call --------------------------------------------------------------------


def multi(bench: Bench) -> None:
    a = bench.args
    names = [f"m{i}" for i in range(a.engines)]
    slice_bytes = a.budget_bytes // a.engines
    for i, name in enumerate(names):
        port = a.port + i
        if a.config == "static":
            cmd = serve_cmd(
                a,
                name,
                port,
                ["--kv-cache-memory-bytes", str(slice_bytes), "--gpu-memory-utilization", str(a.gpu_util)],
            )
            start_server(bench.servers, bench.args.out, name, port, cmd, bench.env, kv_bytes=slice_bytes)
        else:
            limit = a.budget_bytes - (a.engines - 1) * a.floor_bytes
            env = dict(bench.env, KVCACHED_SHM_NAME=bench.shm_name or "", KVCACHED_VIRTUAL_BYTES=str(a.budget_bytes))
            cmd = [
                "kvctl",
                "launch",
                "--name",
                name,
                "--limit",
                str(limit),
                "--",
                *serve_cmd(a, name, port, ["--gpu-memory-utilization", str(a.gpu_util)]),
            ]
            start_server(bench.servers, bench.args.out, name, port, cmd, env)
    bench.startup_s = wait_healthy(bench.servers, 420)
    print(f"{a.engines} {a.config} engines healthy after {bench.startup_s:.0f} s", flush=True)
    if a.config == "kvcached":
        set_budget(bench, a.budget_bytes)
    warm_up(bench.servers)
    # (lengths, peak rate, label suffix, budget lifted), a rate's reruns right after it; a
    # rerun keeps the rate's seed, so every run of a rate, in either configuration, sends
    # the same requests
    plan: list[tuple[str, float, str, bool]] = []
    for r in a.rates:
        plan.append(("fixed", r, "", False))
        if a.config == "kvcached" and r in a.without_budget:
            plan.append(("fixed", r, "-nobudget", True))
        if r in a.again:
            plan.append(("fixed", r, "-r2", False))
    plan += [("sharegpt", r, "", False) for r in a.sharegpt_rates]
    for kind, rate, suffix, lifted in plan:
        schedule = StaggeredPeaks(
            names,
            peak_rps=rate,
            base_rps=a.base_rps,
            lead_s=a.lead_s,
            ramp_s=a.ramp_s,
            hold_s=a.hold_s,
            offset_s=a.offset_s,
            tail_s=a.tail_s,
        )
        if not fits(bench, schedule.duration_s + 30):
            continue
        if lifted:
            # No budget: no packing and no fair share; each engine keeps its own limit.
            set_budget(bench, None)
        try:
            run_one(bench, f"{a.config}-{kind}-{rate:g}{suffix}", schedule, kind, seed=int(rate * 10))
        finally:
            if lifted:
                set_budget(bench, a.budget_bytes)


def set_budget(bench: Bench, budget_bytes: int | None) -> None:
    from kvcached.control import Controller

    with Controller.open(bench.shm_name, create=True) as ctl:
        if ctl.snapshot().gpus or not bench.args.fake:  # stand-in servers register nothing
            ctl.set_budget(0, budget_bytes)


def overhead(bench: Bench) -> None:
    a = bench.args
    loads = [(label, float(rps), float(dur)) for label, rps, dur in (x.split(":") for x in a.loads.split(","))]
    if a.paired:
        overhead_paired(bench, loads)
        return
    for mode in ("vanilla", "kvcached"):
        if not fits(bench, 90 + sum(d + 20 for _, _, d in loads)):
            break
        cmd = serve_cmd(a, "m0", a.port, [])
        env = bench.env
        if mode == "kvcached":
            env = dict(bench.env, KVCACHED_SHM_NAME=bench.shm_name or "")
            cmd = ["kvctl", "launch", "--name", "m0", "--", *cmd]
        server = start_server(bench.servers, bench.args.out, "m0", a.port, cmd, env, log_name=f"server_m0_{mode}.log")
        startup = wait_healthy([server], 420)
        print(f"{mode}: healthy after {startup:.0f} s", flush=True)
        warm_up([server])
        for i, (label, rps, dur) in enumerate(loads):
            schedule = ConstantRate(["m0"], rps, dur)
            # a seed per load: no prompt repeats across loads, so no run hits the last one's prefix cache
            run_one(bench, f"overhead-{mode}-{label}", schedule, "fixed", seed=7 + i)
            bench.runs[-1]["startup_s"] = startup
        stop_servers(bench.servers)


def overhead_paired(bench: Bench, loads: list[tuple[str, float, float]]) -> None:
    """Vanilla and kvcached servers up side by side, each with the same KV memory
    (``--paired-kv``), and every load run against one, then the other, ``--repeat`` times
    (ABBA order): run-to-run drift hits both alike and no server restarts between runs.
    The idle server only waits. Runs are labelled ``overhead-<mode>-<load>-r<k>``."""
    a = bench.args
    util = ["--gpu-memory-utilization", str(a.gpu_util)]
    vanilla_cmd = serve_cmd(a, "vanilla", a.port, ["--kv-cache-memory-bytes", str(a.paired_kv_bytes), *util])
    vanilla = start_server(bench.servers, bench.args.out, "vanilla", a.port, vanilla_cmd, bench.env, log_name="server_vanilla.log")
    startup = {"vanilla": wait_healthy([vanilla], 420)}  # one at a time: they share the compile cache
    env = dict(bench.env, KVCACHED_SHM_NAME=bench.shm_name or "", KVCACHED_VIRTUAL_BYTES=str(a.paired_kv_bytes))
    kv_cmd = ["kvctl", "launch", "--name", "kvcached", "--", *serve_cmd(a, "kvcached", a.port + 1, util)]
    kvcached = start_server(bench.servers, bench.args.out, "kvcached", a.port + 1, kv_cmd, env, log_name="server_kvcached.log")
    startup["kvcached"] = wait_healthy([kvcached], 420)
    print(f"paired: vanilla healthy after {startup['vanilla']:.0f} s, kvcached after {startup['kvcached']:.0f} s", flush=True)
    warm_up([vanilla, kvcached])
    for k in range(1, a.repeat + 1):
        for i, (label, rps, dur) in enumerate(loads):
            if not fits(bench, 2 * (dur + 10)):
                return
            order = ("vanilla", "kvcached") if (k + i) % 2 else ("kvcached", "vanilla")
            for mode in order:
                # both sides of a pair get the same requests; a new draw per repeat and load
                schedule = ConstantRate(["m0"], rps, dur)
                run_one(bench, f"overhead-{mode}-{label}-r{k}", schedule, "fixed", seed=100 * k + i, send_to=mode)
                bench.runs[-1]["startup_s"] = startup[mode]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kind", choices=["multi", "overhead"])
    ap.add_argument("--config", choices=["static", "kvcached"], default="static", help="multi: how KV memory is split")
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--engines", type=int, default=3)
    ap.add_argument("--budget", default="18GiB", help="KV memory of all engines together")
    ap.add_argument("--floor", default="1GiB", help="kvcached: memory each engine's limit leaves to every peer")
    ap.add_argument(
        "--gpu-util", type=float, help="--gpu-memory-utilization of each engine (multi: 0.28, overhead --paired: 0.45)"
    )
    ap.add_argument("--rates", default="10,20,30,40", help="peak request rates (req/s), fixed 256/256 lengths")
    ap.add_argument("--sharegpt-rates", default="30", help="peak rates of the ShareGPT-like length variant")
    ap.add_argument("--again", default="", help="multi: of --rates, those to run a second time (right after the first)")
    ap.add_argument(
        "--without-budget", default="", help="multi --config kvcached: of --rates, those to run again with no GPU budget"
    )
    ap.add_argument("--base-rps", type=float, default=1.0)
    ap.add_argument("--lead-s", type=float, default=3.0)
    ap.add_argument("--ramp-s", type=float, default=3.0)
    ap.add_argument("--hold-s", type=float, default=8.0)
    ap.add_argument("--offset-s", type=float, default=11.0)
    ap.add_argument("--tail-s", type=float, default=3.0)
    ap.add_argument(
        "--loads", default="low:2:30,medium:8:30,saturating:100:15", help="overhead: label:rps:seconds, comma separated"
    )
    ap.add_argument("--paired", action="store_true", help="overhead: both servers up at once, loads alternated")
    ap.add_argument("--repeat", type=int, default=3, help="overhead --paired: runs of each load on each server")
    ap.add_argument("--paired-kv", default="40GiB", help="overhead --paired: KV memory of each server")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--port", type=int, default=8100)
    ap.add_argument("--extra", default="", help="extra vllm serve arguments")
    ap.add_argument("--fake", action="store_true", help="rehearse with fake_server.py instead of vLLM (no GPU)")
    ap.add_argument("--fake-max-running", type=int, default=64)
    ap.add_argument("--deadline-s", type=float, default=570.0, help="stop starting runs after this")
    args = ap.parse_args()
    from kvcached.units import parse_size

    args.budget_bytes, args.floor_bytes = parse_size(args.budget), parse_size(args.floor)
    args.paired_kv_bytes = parse_size(args.paired_kv)
    if args.gpu_util is None:
        args.gpu_util = 0.45 if args.paired else 0.28
    if args.repeat < 1:
        ap.error(f"--repeat must be >= 1, got {args.repeat}")
    args.rates = [float(r) for r in args.rates.split(",") if r]
    args.sharegpt_rates = [float(r) for r in args.sharegpt_rates.split(",") if r]
    args.again = [float(r) for r in args.again.split(",") if r]
    args.without_budget = [float(r) for r in args.without_budget.split(",") if r]
    for flag, rates in (("--again", args.again), ("--without-budget", args.without_budget)):
        if set(rates) - set(args.rates):
            ap.error(f"{flag} takes rates of --rates ({', '.join(f'{r:g}' for r in args.rates)})")
    if args.without_budget and (args.kind != "multi" or args.config != "kvcached"):
        ap.error("--without-budget applies to multi --config kvcached only")
    if args.kind == "multi" and args.engines * args.floor_bytes >= args.budget_bytes:
        ap.error("--floor times --engines must stay below --budget")
    if args.kind == "overhead":
        args.config = "overhead"
    args.kind = args.config if args.kind == "multi" else "overhead"
    os.makedirs(args.out, exist_ok=True)
    bench = Bench(args, base_env())
    if args.kind in ("kvcached", "overhead"):
        bench.shm_name = f"kvcached-bench-{os.getpid()}"
    try:
        multi(bench) if args.kind != "overhead" else overhead(bench)
    finally:
        stop_servers(bench.servers)
        save(bench)
        if bench.shm_name:
            from kvcached.control import Controller

            Controller.unlink(bench.shm_name)
    print(f"done in {time.time() - bench.t_start:.0f} s; {len(bench.runs)} runs in {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
