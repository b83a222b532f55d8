#!/usr/bin/env python3
"""SGLang 0.5.17 with and without kvcached on one GPU: same greedy outputs, elastic
memory, release/resume of the KV cache.

Run on the GPU machine after scripts/gpu/sglang/stage_sglang.sh (SGLang in
/tmp/site-sglang, on PYTHONPATH) and `pip install --no-build-isolation --no-deps .`
(kvcached, with its .pth hook):

    python3 scripts/gpu/sglang/sglang_kvcached_check.py --model /tmp/llama-tiny --out $OUT

1. plain `python -m sglang.launch_server` (dummy weights, Triton attention, memory
   saver on, greedy): outputs for a fixed prompt set;
2. the same server under `kvctl launch --name ...` (ENABLE_KVCACHED=true): the same
   outputs, `kvctl ls --json` shows the engine, mapped KV memory rises under a burst of
   long requests and falls back after it, `/release_memory_occupation` of `kv_cache`
   takes the engine's mapped KV memory to 0 and `/resume_memory_occupation` serves again.
Prints PASS/FAIL per check and writes $OUT/sglang_check.json. Exit 0 when every check held.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from serving import engine_mapped, engine_row, http, kvctl_ls, start, stop, wait_healthy

PROMPTS = [
    "The memory page is",
    "Elastic KV caches let several models",
    "In a virtual memory system, a page fault",
    "SGLang schedules requests by",
    "One two three four five six",
    "The quick brown fox",
    "GPU memory is shared between",
    "A radix tree maps token prefixes to",
]
SERVED_NAME = "llama"






def complete(base: str, prompt: str, max_tokens: int) -> str:
    out = http("POST", base + "/v1/completions", {
        "model": SERVED_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
    })
    return out["choices"][0]["text"]












def wait_for(predicate: Any, limit_s: float) -> bool:
    deadline = time.time() + limit_s
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.25)
    return bool(predicate())


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    ap.add_argument("--port", type=int, default=8021)
    ap.add_argument("--name", default="llama-sglang", help="kvctl engine name")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--extra", default="", help="extra sglang.launch_server arguments")
    ap.add_argument("--skip-plain", action="store_true")
    # The tiny model holds 1 KiB of KV per token: a 64 MiB bound kept the whole burst
    # (128 requests of ~520 tokens) cached on the H200, and nothing could fall.
    ap.add_argument("--prefix-cache-max", default="2MiB", help="KVCACHED_PREFIX_CACHE_MAX for the kvcached run")
    args = ap.parse_args()
    base = f"http://127.0.0.1:{args.port}"
    serve = [sys.executable, "-m", "sglang.launch_server", "--model-path", args.model, "--load-format", "dummy",
             "--attention-backend", "triton", "--sampling-backend", "pytorch", "--enable-memory-saver",
             "--context-length", "4096", "--host", "127.0.0.1", "--port", str(args.port),
             "--served-model-name", SERVED_NAME, "--random-seed", "0", *args.extra.split()]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.pop("ENABLE_KVCACHED", None)
    report: dict[str, Any] = {"checks": {}, "command": serve, "prefix_cache_max": args.prefix_cache_max}
    checks = report["checks"]

    plain: list[str] = []
    if not args.skip_plain:
        proc = start(serve, env, os.path.join(args.out, "sglang_plain.log"))
        try:
            report["plain_startup_s"] = wait_healthy(base, proc, 900)
            plain = [complete(base, p, args.max_tokens) for p in PROMPTS]
        finally:
            stop(proc)
        print(f"plain SGLang: healthy after {report['plain_startup_s']:.0f} s, {len(plain)} completions")

    # The radix cache keeps finished requests' KV; bounded (and evicted page-aware) it
    # lets whole page groups empty after the burst.
    kv_env = dict(env, KVCACHED_SHM_NAME=f"kvcached-sglcheck-{os.getpid()}", KVCACHED_TRIM_IDLE_S="0.5",
                  KVCACHED_PREFIX_CACHE_MAX=args.prefix_cache_max)
    proc = start(["kvctl", "launch", "--name", args.name, "--", *serve], kv_env,
                 os.path.join(args.out, "sglang_kvcached.log"))
    samples: list[tuple[float, int | None]] = []
    stop_sampling = threading.Event()

    def sample() -> None:
        t0 = time.time()
        while not stop_sampling.is_set():
            samples.append((round(time.time() - t0, 2), engine_mapped(kvctl_ls(kv_env), args.name)))
            time.sleep(0.25)

    def mapped() -> int:
        return engine_mapped(kvctl_ls(kv_env), args.name) or 0

    try:
        report["kvcached_startup_s"] = wait_healthy(base, proc, 900)
        listing = kvctl_ls(kv_env)
        report["kvctl_ls_idle"] = listing
        checks["kvctl_ls_shows_engine"] = engine_mapped(listing, args.name) is not None
        idle = mapped()
        ours = [complete(base, p, args.max_tokens) for p in PROMPTS]
        report["outputs_kvcached"], report["outputs_plain"] = ours, plain
        if plain:
            checks["greedy_outputs_identical"] = ours == plain
        threading.Thread(target=sample, daemon=True).start()
        time.sleep(1)
        with ThreadPoolExecutor(64) as pool:  # a burst: 256 long requests, 64 at a time
            list(pool.map(lambda i: complete(base, f"{PROMPTS[i % 8]} {i}", 512), range(256)))
        time.sleep(4)
        stop_sampling.set()
        peak = max((m or 0) for _, m in samples)
        after = mapped()
        report.update(idle_mapped=idle, peak_mapped=peak, after_mapped=after, samples=samples)
        checks["mapped_rises_under_load"] = peak > idle
        checks["mapped_falls_after_load"] = after < peak / 2
        try:
            report["release_response"] = http("POST", base + "/release_memory_occupation", {"tags": ["kv_cache"]})
        except urllib.error.HTTPError as e:
            report["release_response"] = f"HTTP {e.code}: {e.read().decode(errors='replace')[:500]}"
        checks["release_takes_kv_to_zero"] = wait_for(lambda: engine_mapped(kvctl_ls(kv_env), args.name) == 0, 10)
        report["released_mapped"] = mapped()
        released = kvctl_ls(kv_env)
        report["released_listing"] = released
        checks["released_engine_is_sleeping"] = "sleep" in str((engine_row(released, args.name) or {}).get("state"))
        http("POST", base + "/resume_memory_occupation", {"tags": ["kv_cache"]})
        report["resumed_mapped"] = mapped()
        again = complete(base, PROMPTS[0], args.max_tokens)
        checks["serves_after_resume"] = len(again) > 0
        if plain:
            checks["output_after_resume_identical"] = again == plain[0]
        report["after_resume_output"] = again
    finally:
        stop_sampling.set()
        stop(proc)
    report["launch_exit_code"] = proc.returncode
    with open(os.path.join(args.out, "sglang_check.json"), "w") as f:
        json.dump(report, f, indent=1)
    mib = 1 << 20
    print(f"kvcached SGLang: healthy after {report.get('kvcached_startup_s', 0):.0f} s; mapped KV idle "
          f"{report.get('idle_mapped', 0) / mib:.0f} MiB, peak {report.get('peak_mapped', 0) / mib:.0f} MiB, "
          f"4 s after the burst {report.get('after_mapped', 0) / mib:.0f} MiB, released "
          f"{report.get('released_mapped')}, resumed {report.get('resumed_mapped')}")
    for name, ok in checks.items():
        print(f"  {'PASS' if ok else 'FAIL'}  {name}")
    return 0 if checks and all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
