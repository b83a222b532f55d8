"""What a serving benchmark reads from the engines while it runs: vLLM's /metrics and the
kvcached control plane.

``Sampler`` records queue depth and KV memory of every engine every interval (the memory
plots and the memory-return rule); ``timing_totals`` / ``timing_means`` take vLLM's own
first-token histograms before and after a run, so a run says where its first tokens' time
went (queue, prefill, the rest).
"""

from __future__ import annotations

import re
import threading
import time
import urllib.request
from typing import Any

from servers import Server

_METRIC_RE = re.compile(r'^(vllm:[a-z_]+)\{[^}]*model_name="([^"]+)"[^}]*\}\s+([0-9.eE+-]+)', re.M)
_METRICS = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc")
# vLLM's histograms of where a request's first token went, as (sum, count) per model:
# ttft from the API server's arrival to the first token out, queue from the scheduler's
# queue to the step that admits it, prefill from that step to the first token.
_HIST_RE = re.compile(r'^vllm:([a-z_]+)_seconds_(sum|count)\{[^}]*model_name="([^"]+)"[^}]*\}\s+([0-9.eE+-]+)', re.M)
_TIMINGS = {"time_to_first_token": "ttft", "request_queue_time": "queue", "request_prefill_time": "prefill"}


class Sampler:
    """Queue depth and KV usage of every server (from /metrics) and, under kvcached, the
    mapped / used / cached bytes of every engine (from the control plane), every interval."""

    def __init__(self, servers: list[Server], shm_name: str | None, interval_s: float = 0.25) -> None:
        self.servers, self.interval_s = servers, interval_s
        self.controller = None
        if shm_name:
            from kvcached.control import Controller

            self.controller = Controller.open(shm_name, create=True)
        self.samples: list[dict[str, Any]] = []
        self._t0 = time.time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self, t0: float) -> None:
        self._t0 = t0
        self._thread.start()

    def stop(self) -> list[dict[str, Any]]:
        self._stop.set()
        self._thread.join()
        if self.controller is not None:
            self.controller.close()
        return self.samples

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            sample: dict[str, Any] = {"t": round(time.time() - self._t0, 3), "engines": {}}
            for s in self.servers:
                sample["engines"][s.name] = self._scrape(s)
            if self.controller is not None:
                snap = self.controller.snapshot()
                for e in snap.engines:
                    sample["engines"].setdefault(e.name, {}).update(
                        mapped=e.mapped_bytes, used=e.used_bytes, cached=e.cached_bytes, denied=e.num_denied,
                        sync_maps=e.num_sync_maps,
                    )
                sample["gpu_mapped"] = sum(g.mapped_bytes for g in snap.gpus)
            self.samples.append(sample)

    @staticmethod
    def _scrape(s: Server) -> dict[str, Any]:
        text = metrics_text(s)
        if text is None:
            return {}
        out: dict[str, Any] = {}
        for metric, model, value in _METRIC_RE.findall(text):
            if metric in _METRICS and model == s.name:
                out[metric.split(":")[1]] = float(value)
        if s.kv_bytes is not None:
            out["mapped"] = s.kv_bytes
            out["used"] = int(out.get("kv_cache_usage_perc", 0.0) * s.kv_bytes)
        return out


def metrics_text(s: Server) -> str | None:
    try:
        with urllib.request.urlopen(s.url + "/metrics", timeout=1) as r:
            return str(r.read().decode())
    except OSError:
        return None


def timing_totals(servers: list[Server]) -> dict[str, dict[str, float]]:
    """Each server's first-token histograms now: ``{model: {"queue_sum": s, "queue_count": n, ...}}``
    (summed over label sets; a server that does not answer is left out)."""
    out: dict[str, dict[str, float]] = {}
    for s in servers:
        text = metrics_text(s)
        if text is None:
            continue
        totals = out.setdefault(s.name, {})
        for metric, part, model, value in _HIST_RE.findall(text):
            if metric in _TIMINGS and model == s.name:
                key = f"{_TIMINGS[metric]}_{part}"
                totals[key] = totals.get(key, 0.0) + float(value)
    return out


def timing_means(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]) -> dict[str, dict[str, Any]]:
    """Per model, the mean of each first-token part over the requests between two
    :func:`timing_totals` (seconds; None where none finished that part) and their count."""
    means: dict[str, dict[str, Any]] = {}
    for model, end in after.items():
        start = before.get(model, {})
        row: dict[str, Any] = {}
        for part in _TIMINGS.values():
            n = end.get(f"{part}_count", 0.0) - start.get(f"{part}_count", 0.0)
            total = end.get(f"{part}_sum", 0.0) - start.get(f"{part}_sum", 0.0)
            row[f"{part}_mean_s"] = total / n if n > 0 else None
            row[f"{part}_n"] = int(n)
        means[model] = row
    return means


def engines_idle(servers: list[Server]) -> bool:
    return all(not Sampler._scrape(s).get("num_requests_running") for s in servers)
