#!/usr/bin/env python3
"""vLLM with and without kvcached on one GPU: same greedy outputs, elastic memory, sleep.

Run on the GPU machine after scripts/gpu/stage_vllm.sh (vLLM in /tmp/site) and
`pip install --no-build-isolation --no-deps .` (kvcached, with its .pth hook):

    python3 scripts/gpu/vllm_kvcached_check.py --model /tmp/llama8b --out $OUT

1. plain `vllm serve` (dummy weights, greedy): outputs for a fixed prompt set;
2. the same server under `kvctl launch` (ENABLE_KVCACHED=true): the same outputs,
   `kvctl ls` shows the engine, mapped KV memory rises under a burst of long requests
   and falls back after it, `/sleep` takes KV memory to zero and `/wake_up` serves again.
Prints a summary and writes $OUT/vllm_check.json. Exit 0 when every check held.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from serving import engine_mapped, http, kvctl_ls, start, stop, wait_healthy

PROMPTS = [
    "The memory page is",
    "Elastic KV caches let several models",
    "In a virtual memory system, a page fault",
    "vLLM schedules requests by",
    "One two three four five six",
    "The quick brown fox",
    "GPU memory is shared between",
    "A block table maps tokens to",
]






def complete(base: str, prompt: str, max_tokens: int) -> list[int] | str:
    out = http("POST", base + "/v1/completions", {
        "model": "llama", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
        "ignore_eos": True, "logprobs": 0,
    })
    choice = out["choices"][0]
    return choice["text"]










def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    ap.add_argument("--port", type=int, default=8011)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--extra", default="", help="extra vllm serve arguments")
    ap.add_argument("--skip-plain", action="store_true")
    args = ap.parse_args()
    base = f"http://127.0.0.1:{args.port}"
    serve = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", args.model, "--load-format", "dummy",
             "--attention-backend", "TRITON_ATTN", "--max-model-len", "4096", "--host", "127.0.0.1",
             "--port", str(args.port), "--served-model-name", "llama", "--seed", "0", "--enable-sleep-mode",
             *args.extra.split()]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_NO_USAGE_STATS="1",
               VLLM_SERVER_DEV_MODE="1", PYTHONUNBUFFERED="1",
               VLLM_USE_FLASHINFER_SAMPLER="0")  # flashinfer is not staged
    env.pop("ENABLE_KVCACHED", None)
    report: dict = {"checks": {}}
    checks = report["checks"]

    plain: list = []
    if not args.skip_plain:
        proc = start([*serve, "--gpu-memory-utilization", "0.5"], env, os.path.join(args.out, "vllm_plain.log"))
        try:
            report["plain_startup_s"] = wait_healthy(base, proc, 600)
            plain = [complete(base, p, args.max_tokens) for p in PROMPTS]
        finally:
            stop(proc)
        print(f"plain vLLM: healthy after {report['plain_startup_s']:.0f} s, {len(plain)} completions")

    kv_env = dict(env, KVCACHED_SHM_NAME=f"kvcached-gpucheck-{os.getpid()}", KVCACHED_TRIM_IDLE_S="0.5")
    proc = start(["kvctl", "launch", "--name", "llama8b", "--", *serve], kv_env, os.path.join(args.out, "vllm_kvcached.log"))
    samples: list[tuple[float, int | None]] = []
    stop_sampling = threading.Event()

    def sample() -> None:
        t0 = time.time()
        while not stop_sampling.is_set():
            samples.append((round(time.time() - t0, 2), engine_mapped(kvctl_ls(kv_env), "llama8b")))
            time.sleep(0.25)

    try:
        report["kvcached_startup_s"] = wait_healthy(base, proc, 600)
        listing = kvctl_ls(kv_env)
        report["kvctl_ls_idle"] = listing
        checks["kvctl_ls_shows_engine"] = any(e.get("name") == "llama8b" for e in listing.get("engines", []))
        idle = engine_mapped(listing, "llama8b") or 0
        ours = [complete(base, p, args.max_tokens) for p in PROMPTS]
        report["outputs_kvcached"], report["outputs_plain"] = ours, plain
        if plain:
            checks["greedy_outputs_identical"] = ours == plain
        threading.Thread(target=sample, daemon=True).start()
        time.sleep(1)
        with ThreadPoolExecutor(64) as pool:  # a burst: 64 long requests at once
            list(pool.map(lambda i: complete(base, f"{PROMPTS[i % 8]} {i}", 512), range(128)))
        burst_end = time.time()
        time.sleep(4)
        stop_sampling.set()
        peak = max((m or 0) for _, m in samples)
        after = engine_mapped(kvctl_ls(kv_env), "llama8b") or 0
        report.update(idle_mapped=idle, peak_mapped=peak, after_mapped=after, samples=samples,
                      burst_seconds=round(burst_end - report["kvcached_startup_s"], 1))
        checks["mapped_rises_under_load"] = peak > idle
        checks["mapped_falls_after_load"] = after < peak / 2
        http("POST", base + "/sleep?level=1")
        time.sleep(1.5)
        asleep = engine_mapped(kvctl_ls(kv_env), "llama8b")
        report["sleep_mapped"] = asleep
        checks["sleep_takes_kv_to_zero"] = asleep == 0
        http("POST", base + "/wake_up")
        again = complete(base, PROMPTS[0], args.max_tokens)
        checks["serves_after_wake_up"] = isinstance(again, str) and len(again) > 0
        report["after_wake_output"] = again
    finally:
        stop_sampling.set()
        stop(proc)
    report["launch_exit_code"] = proc.returncode
    with open(os.path.join(args.out, "vllm_check.json"), "w") as f:
        json.dump(report, f, indent=1)
    mib = 1 << 20
    print(f"kvcached vLLM: healthy after {report['kvcached_startup_s']:.0f} s; mapped KV idle "
          f"{report.get('idle_mapped', 0) / mib:.0f} MiB, peak {report.get('peak_mapped', 0) / mib:.0f} MiB, "
          f"4 s after the burst {report.get('after_mapped', 0) / mib:.0f} MiB, asleep {report.get('sleep_mapped')}")
    for name, ok in checks.items():
        print(f"  {'PASS' if ok else 'FAIL'}  {name}")
    return 0 if checks and all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
