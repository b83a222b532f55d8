#!/usr/bin/env python3
"""Tables and plots from the serving benchmark's JSON files (``run.py``).

    python3 scripts/bench_serving/report.py docs/results/serving/serving_static.json \
        docs/results/serving/serving_kvcached.json docs/results/serving/serving_overhead.json \
        --img docs/img --md docs/results/serving/summary.md

Prints (and writes with ``--md``) markdown tables: static vs kvcached per peak rate
(TTFT mean/p99, TPOT, throughput, the ratios), how fast each model's mapped memory fell
back after its peak, and the single-engine overhead of kvcached. Plots (``--img``):
``serving_ttft.png`` (TTFT mean and p99 against the peak rate) and
``serving_memory.png`` (KV memory and queue of each engine over one contended run).
``--split DIR`` also writes one JSON per run there.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
from collections.abc import Sequence
from typing import Any

from compare import interval_text, p99_gain_interval, request_deltas

GiB = 1 << 30
MiB = 1 << 20


def configuration(meta: dict[str, Any]) -> str:
    """A run's configuration with the ``KVCACHED_*`` settings its call was made under:
    ``kvcached`` as planned, ``kvcached-compact-off`` for the same with ``KVCACHED_COMPACT=off``
    (a control is its own configuration, never pooled with the runs it controls)."""
    settings = meta.get("kvcached_env") or {}
    return meta["config"] + "".join(
        f"-{key.removeprefix('KVCACHED_').lower().replace('_', '')}-{value.lower()}" for key, value in sorted(settings.items())
    )


def load(paths: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
    """Runs by configuration (static, kvcached, overhead, and any of those under other
    ``KVCACHED_*`` settings: see :func:`configuration`), each with its call's meta.

    Takes the files ``run.py`` writes (one per call, all its runs) and the one-run files
    ``--split`` writes (a run with its ``meta``). A run under other settings is relabelled
    (``kvcached-fixed-10`` becomes ``kvcached-compact-off-fixed-10``), so that tables and
    ``--split`` tell it apart.
    """
    by_config: dict[str, list[dict[str, Any]]] = {}
    for path in paths:
        with open(path) as f:
            doc = json.load(f)
        runs = doc.get("runs", [doc])
        for run in runs:
            run.setdefault("meta", doc.get("meta"))
            base, name = run["meta"]["config"], configuration(run["meta"])
            if name != base and run["label"].startswith(f"{base}-") and not run["label"].startswith(f"{name}-"):
                run["label"] = name + run["label"][len(base):]
            by_config.setdefault(name, []).append(run)
    return by_config


def peak_rate(run: dict[str, Any]) -> float:
    return float(run["schedule"].get("peak_rps", run["schedule"].get("rps", 0.0)))


def ms(x: float | None) -> str:
    return "–" if x is None else f"{x * 1e3:,.0f}"


def ratio(a: float | None, b: float | None) -> str:
    return "–" if not a or not b else f"{a / b:.2f}×"


def headline_table(static: list[dict[str, Any]], *elastic_sets: list[dict[str, Any]]) -> str:
    rows = [
        "| kvcached run | lengths | peak req/s | requests | TTFT mean static / kvcached (ms) "
        "| TTFT p99 static / kvcached (ms) | p99 gain | 95% interval | TPOT mean static / kvcached (ms) "
        "| tok/s static / kvcached |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    pairs = {(r["kind"], peak_rate(r), variant(r)): r for r in static}
    elastic = [r for runs in elastic_sets for r in runs if variant(r) in ("", "-r2")]
    for run in sorted(elastic, key=lambda r: (r["kind"], peak_rate(r), variant(r))):
        key = (run["kind"], peak_rate(run), variant(run))
        if key not in pairs:
            continue
        s, k = pairs[key]["summary"], run["summary"]
        interval = p99_gain_interval(pairs[key], run) if pairs[key].get("seed") == run.get("seed") else None
        rows.append(
            f"| {configuration(run['meta'])} @ {run['meta'].get('commit', '')} | {run['kind']} | {key[1]:g} | {k['count']} "
            f"| {ms(s['ttft_mean_s'])} / {ms(k['ttft_mean_s'])} "
            f"| {ms(s['ttft_p99_s'])} / {ms(k['ttft_p99_s'])} | {ratio(s['ttft_p99_s'], k['ttft_p99_s'])} "
            f"| {interval_text(interval)} | {ms(s['tpot_mean_s'])} / {ms(k['tpot_mean_s'])} "
            f"| {s['output_tokens_per_s']:,.0f} / {k['output_tokens_per_s']:,.0f} |"
        )
    return "\n".join(rows)


def variant(run: dict[str, Any]) -> str:
    """What follows the peak rate in a multi run's label: "" (the plan's run), "-r2" (run
    again, ``--again``), "-nobudget" (kvcached with the GPU budget lifted)."""
    m = re.match(rf"^.*-{re.escape(run.get('kind', ''))}-[0-9.]+(.*)$", run["label"])
    return m.group(1) if m else ""


def pairs_table(runs: list[dict[str, Any]]) -> str:
    """Every two runs of one peak rate that sent the same requests (reruns, both
    configurations, the budget lifted), compared request by request: the median of the
    per-request TTFT differences and the p99 ratio with its paired interval. A rate run
    more than twice shows how far runs of one configuration differ from each other."""
    rows = [
        "| lengths | peak req/s | run A | run B | requests | TTFT p50 A / B (ms) | median B − A (ms) "
        "| B slower on | TTFT p99 A / B (ms) | p99 A / B | 95% interval |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    groups: dict[tuple[str, float, int | None], list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["kind"], peak_rate(run), run.get("seed")), []).append(run)
    for (kind, rate, _), group in sorted(groups.items(), key=lambda g: (g[0][0], g[0][1])):
        if len(group) < 3:
            continue
        for i, a in enumerate(group):
            for b in group[i + 1 :]:
                deltas = request_deltas(a, b)
                if not deltas:
                    continue
                interval = p99_gain_interval(a, b)
                sa, sb = a["summary"], b["summary"]
                rows.append(
                    f"| {kind} | {rate:g} | {a['label']} | {b['label']} | {len(deltas)} "
                    f"| {sa['ttft_p50_s'] * 1e3:.1f} / {sb['ttft_p50_s'] * 1e3:.1f} "
                    f"| {statistics.median(deltas) * 1e3:+.2f} | {sum(d > 0 for d in deltas) / len(deltas):.0%} "
                    f"| {ms(sa['ttft_p99_s'])} / {ms(sb['ttft_p99_s'])} | {ratio(sa['ttft_p99_s'], sb['ttft_p99_s'])} "
                    f"| {interval_text(interval)} |"
                )
    return "\n".join(rows)


def timing_table(runs: list[dict[str, Any]]) -> str:
    """Where the first token's time went, from vLLM's own histograms (means over the run's
    requests, all engines): queued in the scheduler, the admitting step to the first token,
    the rest of the engine's TTFT (API server in, tokens out), and what the client saw
    beyond the engine's TTFT (HTTP, streaming)."""
    rows = [
        "| run | requests | client TTFT (ms) | engine TTFT (ms) | queue (ms) | prefill (ms) "
        "| rest of the engine's (ms) | client − engine (ms) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in runs:
        timing = run.get("engine_timing") or {}
        sums: dict[str, float] = {}
        for row in timing.values():
            for part in ("ttft", "queue", "prefill"):
                if row.get(f"{part}_mean_s") is not None:
                    sums[f"{part}_sum"] = sums.get(f"{part}_sum", 0.0) + row[f"{part}_mean_s"] * row[f"{part}_n"]
                    sums[f"{part}_n"] = sums.get(f"{part}_n", 0) + row[f"{part}_n"]
        if not sums.get("ttft_n") or not sums.get("queue_n") or not sums.get("prefill_n"):
            continue
        ttft, queue, prefill = (sums[f"{p}_sum"] / sums[f"{p}_n"] for p in ("ttft", "queue", "prefill"))
        client = run["summary"]["ttft_mean_s"]
        rows.append(
            f"| {run['label']} | {int(sums['ttft_n'])} | {client * 1e3:.2f} | {ttft * 1e3:.2f} | {queue * 1e3:.2f} "
            f"| {prefill * 1e3:.2f} | {(ttft - queue - prefill) * 1e3:.2f} | {(client - ttft) * 1e3:.2f} |"
        )
    return "\n".join(rows) if len(rows) > 2 else ""


def series(run: dict[str, Any], engine: str, key: str) -> list[tuple[float, float]]:
    return [(s["t"], float(s["engines"].get(engine, {}).get(key, 0.0) or 0.0)) for s in run["samples"]]


def state_at(
    run: dict[str, Any], engine: str, t: float, keys: Sequence[str] = ("num_requests_running", "mapped", "used", "cached")
) -> dict[str, float] | None:
    """An engine's sampled ``keys`` (running requests, mapped / used / cached bytes) at the
    first sample at or after ``t`` (None after the last sample)."""
    sample = next((s for s in run["samples"] if s["t"] >= t), None)
    if sample is None:
        return None
    values = sample["engines"].get(engine, {})
    return {k: float(values.get(k, 0.0) or 0.0) for k in keys}


def memory_return(run: dict[str, Any]) -> list[dict[str, Any]]:
    """Per engine: when its queue drained after its peak, and when its mapped memory fell
    back to its base-load level (the lead window's peak plus 256 MiB, or 1.5× it)."""
    out = []
    windows = run.get("peak_windows") or {}
    lead_end = min((w[0] for w in windows.values()), default=0.0)
    for engine, (start, end) in sorted(windows.items()):
        running, waiting, mapped = (
            series(run, engine, k) for k in ("num_requests_running", "num_requests_waiting", "mapped")
        )
        lead_run = [v for t, v in running if t < lead_end] or [0.0]
        lead_map = [v for t, v in mapped if t < lead_end] or [0.0]
        base_running = sorted(lead_run)[int(0.95 * (len(lead_run) - 1))]
        base_mapped = max(lead_map)
        threshold = max(base_mapped + 256 * MiB, 1.5 * base_mapped)
        peak_mapped = max((v for t, v in mapped if start <= t), default=0.0)
        t_drain = next(
            (t for (t, r), (_, w) in zip(running, waiting, strict=False) if t >= end and w == 0 and r <= base_running + 2), None
        )
        t_mem = None
        after: dict[str, float] | None = None
        if t_drain is not None:
            t_mem = next((t for t, m in mapped if t >= t_drain and m <= threshold), None)
            # What was mapped 1 s after the drain, and how much of it the engine used or cached.
            after = state_at(run, engine, t_drain + 1.0, ("mapped", "used", "cached"))
        out.append(
            {
                "engine": engine,
                "peak_mapped": peak_mapped,
                "base_mapped": base_mapped,
                "t_drain": t_drain,
                "t_mem": t_mem,
                "lag_s": None if t_mem is None or t_drain is None else round(t_mem - t_drain, 2),
                "after_1s": after,
            }
        )
    return out


def memory_table(elastic: list[dict[str, Any]]) -> str:
    rows = [
        "| run | engine | base-load mapped (MiB) | peak mapped (MiB) | queue drained at (s) | memory back at (s) | lag (s) "
        "| 1 s after the drain: mapped / used / cached (MiB) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for run in elastic:
        for m in memory_return(run):
            after = m["after_1s"]
            split = "–" if after is None else " / ".join(f"{after[k] / MiB:,.0f}" for k in ("mapped", "used", "cached"))
            rows.append(
                f"| {run['label']} | {m['engine']} | {m['base_mapped'] / MiB:,.0f} | {m['peak_mapped'] / MiB:,.0f} "
                f"| {m['t_drain'] if m['t_drain'] is not None else '–'} | {m['t_mem'] if m['t_mem'] is not None else '–'} "
                f"| {m['lag_s'] if m['lag_s'] is not None else '–'} | {split} |"
            )
    return "\n".join(rows)


def overhead_table(runs: list[dict[str, Any]]) -> str:
    """Vanilla vs kvcached per load. Repeats (``overhead-<mode>-<load>-r<k>``, from
    ``run.py overhead --paired``) are pooled: latency statistics over all their requests,
    throughput as the mean of the runs'; the last column gives each pair's TTFT p50 ratio."""
    rows = [
        "| load | req/s | runs | requests | tok/s vanilla / kvcached | ratio | TTFT mean (ms) | ratio "
        "| TTFT p50 (ms) | ratio | TTFT p99 (ms) | TPOT mean (ms) | ratio | p50 ratio per pair |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    groups: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for run in runs:
        mode, _, rest = run["label"].removeprefix("overhead-").partition("-")
        load_name = re.sub(r"-r\d+$", "", rest)
        groups.setdefault(load_name, {}).setdefault(mode, []).append(run)
    for load_name, by_mode in groups.items():
        if not by_mode.get("vanilla") or not by_mode.get("kvcached"):
            continue
        v, k = (pooled(by_mode[m]) for m in ("vanilla", "kvcached"))
        pairs = [
            ratio(b["summary"]["ttft_p50_s"], a["summary"]["ttft_p50_s"])
            for a, b in zip(by_mode["vanilla"], by_mode["kvcached"], strict=False)
        ]
        rows.append(
            f"| {load_name} | {peak_rate(by_mode['vanilla'][0]):g} | {len(by_mode['kvcached'])} | {k['count']} "
            f"| {v['output_tokens_per_s']:,.0f} / {k['output_tokens_per_s']:,.0f} "
            f"| {ratio(k['output_tokens_per_s'], v['output_tokens_per_s'])} "
            f"| {ms(v['ttft_mean_s'])} / {ms(k['ttft_mean_s'])} | {ratio(k['ttft_mean_s'], v['ttft_mean_s'])} "
            f"| {ms(v['ttft_p50_s'])} / {ms(k['ttft_p50_s'])} | {ratio(k['ttft_p50_s'], v['ttft_p50_s'])} "
            f"| {ms(v['ttft_p99_s'])} / {ms(k['ttft_p99_s'])} "
            f"| {ms(v['tpot_mean_s'])} / {ms(k['tpot_mean_s'])} | {ratio(k['tpot_mean_s'], v['tpot_mean_s'])} "
            f"| {', '.join(pairs)} |"
        )
    return "\n".join(rows)


def pooled(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One summary of several runs of the same load: latencies over all their requests."""
    from client import Result, summarize

    if len(runs) == 1:
        return dict(runs[0]["summary"])
    results = [Result(**r) for run in runs for r in run["results"]]
    out = summarize(results)
    rates = [run["summary"]["output_tokens_per_s"] for run in runs if run["summary"]["output_tokens_per_s"]]
    out["output_tokens_per_s"] = sum(rates) / len(rates) if rates else None
    return out


def plot_ttft(
    static: list[dict[str, Any]], elastic: list[dict[str, Any]], path: str, fair: Sequence[dict[str, Any]] = ()
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for runs, name, color in ((static, "static", "tab:red"), (elastic, "kvcached", "tab:blue")):
        fixed = sorted((r for r in runs if r["kind"] == "fixed" and not variant(r)), key=peak_rate)  # one run per rate
        rates = [peak_rate(r) for r in fixed]
        ax.plot(rates, [r["summary"]["ttft_mean_s"] for r in fixed], "o--", color=color, label=f"{name} mean")
        ax.plot(rates, [r["summary"]["ttft_p99_s"] for r in fixed], "s-", color=color, label=f"{name} p99")
    for run in (r for r in fair if r["kind"] == "fixed"):
        commit = run["meta"].get("commit", "")
        ax.plot(
            [peak_rate(run)],
            [run["summary"]["ttft_p99_s"]],
            "*",
            ms=13,
            color="tab:green",
            label=f"kvcached + fair share p99 ({commit})",
        )
        ax.plot(
            [peak_rate(run)],
            [run["summary"]["ttft_mean_s"]],
            "P",
            ms=9,
            color="tab:green",
            label="kvcached + fair share mean",
        )
    ax.set_yscale("log")
    ax.set_xlabel("peak request rate per model (req/s)")
    ax.set_ylabel("TTFT (s)")
    ax.set_title("Three 8B engines on one GPU, staggered peaks (256/256)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_memory(static_run: dict[str, Any] | None, elastic_run: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("kvcached", elastic_run)] + ([("static", static_run)] if static_run else [])
    fig, axes = plt.subplots(2, len(panels), figsize=(6.0 * len(panels), 6.0), sharex=True, squeeze=False)
    for col, (name, run) in enumerate(panels):
        mem_ax, queue_ax = axes[0][col], axes[1][col]
        for i, (engine, (start, end)) in enumerate(sorted((run.get("peak_windows") or {}).items())):
            color = f"C{i}"
            mapped = series(run, engine, "mapped")
            used = series(run, engine, "used")
            mem_ax.plot([t for t, _ in mapped], [v / GiB for _, v in mapped], color=color, label=f"{engine} mapped")
            mem_ax.plot([t for t, _ in used], [v / GiB for _, v in used], color=color, ls=":", label=f"{engine} used")
            waiting = series(run, engine, "num_requests_waiting")
            running = series(run, engine, "num_requests_running")
            queue_ax.plot([t for t, _ in running], [v for _, v in running], color=color, label=f"{engine} running")
            queue_ax.plot(
                [t for t, _ in waiting], [v for _, v in waiting], color=color, ls="--", label=f"{engine} waiting"
            )
            for ax in (mem_ax, queue_ax):
                ax.axvspan(start, end, color=color, alpha=0.07)
        mem_ax.set_title(f"{name}: {run['label']}")
        mem_ax.set_ylabel("KV memory (GiB)")
        queue_ax.set_ylabel("requests")
        queue_ax.set_xlabel("time (s)")
        mem_ax.legend(fontsize=7, ncol=3)
        queue_ax.legend(fontsize=7, ncol=3)
        for ax in (mem_ax, queue_ax):
            ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+")
    ap.add_argument("--img", help="directory for the plots")
    ap.add_argument("--md", help="write the tables to this file too")
    ap.add_argument("--memory-run", help="label of the kvcached run to plot over time (default: the busiest fixed one)")
    ap.add_argument("--split", help="directory for one JSON per run")
    args = ap.parse_args()
    by = load(args.files)
    static, elastic, over = by.get("static", []), by.get("kvcached", []), by.get("overhead", [])
    fair = by.get("kvcached-fairshare", [])
    # kvcached under other settings (a KVCACHED_COMPACT=off control, ...): rows of their own
    others = [runs for name, runs in sorted(by.items()) if name.startswith("kvcached-") and name != "kvcached-fairshare"]
    controls = [run for runs in others for run in runs]
    for name in sorted(n for n in by if n not in ("static", "kvcached", "overhead") and not n.startswith("kvcached-")):
        print(f"report: {len(by[name])} run(s) of configuration {name!r} are in no table (only kvcached has variants)", file=sys.stderr)
    parts = []
    if static and elastic:
        parts += ["### Static slices vs kvcached, per peak rate", headline_table(static, elastic, fair, *others)]
        parts += ["### Memory back after each peak (kvcached)", memory_table(elastic + fair + controls)]
    pairs = pairs_table(static + elastic + controls)
    if pairs.count("\n") > 1:
        parts += ["### Runs of one rate, request by request", pairs]
    timing = timing_table(static + elastic + controls + over)
    if timing:
        parts += ["### Where the first token's time went (vLLM's histograms)", timing]
    if over:
        parts += ["### One engine: vanilla vLLM vs vLLM with kvcached", overhead_table(over)]
    text = "\n\n".join(parts) + "\n"
    print(text)
    if args.md:
        with open(args.md, "w") as f:
            f.write(text)
    if args.img and static and elastic:
        os.makedirs(args.img, exist_ok=True)
        plot_ttft(static, elastic, os.path.join(args.img, "serving_ttft.png"), fair)
        fixed = sorted((r for r in elastic if r["kind"] == "fixed" and not variant(r)), key=peak_rate)
        chosen = next((r for r in elastic if r["label"] == args.memory_run), fixed[-1] if fixed else elastic[-1])
        twin = next((r for r in static if r["kind"] == chosen["kind"] and peak_rate(r) == peak_rate(chosen)), None)
        plot_memory(twin, chosen, os.path.join(args.img, "serving_memory.png"))
    if args.split:
        os.makedirs(args.split, exist_ok=True)
        for runs in by.values():
            for run in runs:
                with open(os.path.join(args.split, f"{run['label']}.json"), "w") as f:
                    json.dump(run, f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
