#!/usr/bin/env python3
"""CPU time of vLLM's scheduler per step, vanilla vs with kvcached (host backend, no GPU).

vLLM's real ``Scheduler`` (built with vLLM's own test helper ``create_scheduler``) keeps
``--running`` requests of 256 + 256 tokens in flight: each step it schedules, gets one
sampled token per request back, and a finished request is replaced by a new one. No
model runs, so a step's time is what the engine core's thread spends in scheduling and
bookkeeping — the part kvcached's block pool adds to. With kvcached the block pool is
``ElasticBlockPool`` over a host arena with the page geometry of a Llama-3.1-8B-shaped
engine on a GPU (64 blocks per page group), registered in a control plane as
``kvctl launch`` does. Each configuration runs in its own process (patching is global).

Run it in the CI's vLLM environment, where vLLM's tests are unpacked:

    KVCACHED_SHM_NAME=bench VLLM_TARGET_DEVICE=cpu HF_HUB_OFFLINE=1 HF_HOME=$VENV/hf-home \\
        $VENV/bin/python scripts/bench_scheduler.py --vllm-tests $VENV/vllm-tests --running 16,1024
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

BLOCK_TOKENS = 16
PREFIX_TOKENS = 128
HOST_PAGE = 64 << 10


def register_arena(num_blocks: int, blocks_per_page: int) -> None:
    """A worker's KV arena as the kvcached worker would make it, on the host backend."""
    from kvcached import _vmm
    from kvcached.integrations.vllm import runtime

    num_pages = -(-num_blocks // blocks_per_page)
    backend = _vmm.HostBackend((2 << 30) + 2 * (num_pages + 1) * HOST_PAGE, HOST_PAGE)
    arena = _vmm.Arena(backend, 2, num_pages * HOST_PAGE, HOST_PAGE)
    block_bytes = 2 * HOST_PAGE // blocks_per_page
    runtime.register_worker_kv(runtime.WorkerKV(arena, backend, num_blocks, blocks_per_page, block_bytes, "bench"))


def measure(mode: str, running: int, steps: int, num_blocks: int, blocks_per_page: int, prefixes: int = 0) -> dict[str, Any]:
    if mode == "kvcached":
        from kvcached.integrations.vllm import testing  # noqa: F401  (arms the patches)

        register_arena(num_blocks, blocks_per_page)
        from kvcached.integrations.vllm import runtime

        runtime.worker_kv().rewrites_blocks = True  # type: ignore[union-attr]  # as our worker patch says
        if os.environ.get("BENCH_NO_NEAR") == "1":  # ablation: packing without keeping a request's blocks together
            from kvcached.integrations.vllm import placement

            placement.blocks_near = lambda *args: []
    # vLLM 0.34 refuses x86 CPUs without Triton; setup_vllm_env.sh leaves beside the tests
    # the plugin that lets that one check pass (it does nothing on 0.33). After the patches
    # are armed: it imports vLLM.
    try:
        import kvcached_x86_without_triton
    except ImportError:
        pass
    else:
        kvcached_x86_without_triton.pytest_configure(None)
    import numpy as np
    from tests.v1.core.utils import create_scheduler
    from vllm.sampling_params import SamplingParams
    from vllm.utils.hashing import sha256
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.outputs import ModelRunnerOutput
    from vllm.v1.request import Request

    sched = create_scheduler(
        max_num_seqs=running,
        max_num_batched_tokens=max(8192, running),
        enable_prefix_caching=True,
        num_blocks=num_blocks,
        block_size=BLOCK_TOKENS,
        max_model_len=1024,
    )
    if mode == "kvcached":
        assert type(sched.kv_cache_manager.block_pool).__name__ == "ElasticBlockPool"
    init_none_hash(sha256)
    hasher = get_request_block_hasher(BLOCK_TOKENS, sha256)
    params = SamplingParams(ignore_eos=True, max_tokens=256)
    params.update_from_generation_config({}, 2)
    rng = np.random.default_rng(running)
    serial = 0
    # --prefixes K: every prompt starts with one of K shared 128-token prefixes (a system
    # prompt), so the prefix cache's eviction order shows in its hit rate.
    shared = [rng.integers(1000, 30000, PREFIX_TOKENS).tolist() for _ in range(prefixes)]
    lookups = {"requests": 0, "tokens": 0, "hits": 0}

    def record(request: Any, num_hits: int) -> None:  # what vLLM reports per admitted request
        lookups["requests"] += 1
        lookups["tokens"] += request.num_tokens
        lookups["hits"] += num_hits

    if prefixes:
        sched.kv_cache_manager.record_prefix_cache_stats = record

    def add(n: int) -> None:
        # distinct random prompts: no prefix-cache hits, as with the serving benchmark's
        nonlocal serial
        for _ in range(n):
            if shared:
                head = shared[int(rng.integers(len(shared)))]
                prompt = head + rng.integers(1000, 30000, 256 - len(head)).tolist()
            else:
                prompt = rng.integers(1000, 30000, 256).tolist()
            sched.add_request(Request(f"r{serial}", prompt, params, None, block_hasher=hasher))
            serial += 1

    add(running)
    if os.environ.get("BENCH_GC") == "off":
        import gc

        gc.disable()
    times: list[float] = []
    cpu: list[float] = []
    syncs: list[int] = []
    finished = tokens = moved = 0
    kvpages = getattr(sched.kv_cache_manager.block_pool, "kv", None)
    with_index = "req_id_to_index" in {f.name for f in dataclasses.fields(ModelRunnerOutput)}
    for _ in range(steps):
        t, c = time.perf_counter(), time.thread_time()
        out = sched.schedule()
        moves = getattr(out, "kvcached_moves", None)  # compaction (KVCACHED_COMPACT): no bytes to copy here
        if moves is not None:
            moves.copied(None)
            moved += len(moves.pairs)
        ids = list(out.num_scheduled_tokens)
        tokens += out.total_num_scheduled_tokens
        index = {"req_id_to_index": {r: i for i, r in enumerate(ids)}} if with_index else {}  # gone in 0.34
        mro = ModelRunnerOutput(req_ids=ids, sampled_token_ids=[[7] for _ in ids], logprobs=None,
                                prompt_logprobs_dict={}, pooler_output=[], **index)
        outputs = sched.update_from_output(out, mro)
        times.append(time.perf_counter() - t)
        cpu.append(time.thread_time() - c)
        if kvpages is not None:
            syncs.append(kvpages.stats().num_sync_maps)
        done = sum(o.finish_reason is not None for eco in outputs.values() for o in eco.outputs)
        finished += done
        if done:
            add(done)
    steady, steady_cpu = times[len(times) // 4 :], cpu[len(cpu) // 4 :]
    pool = sched.kv_cache_manager.block_pool
    res: dict[str, Any] = {
        "mode": mode,
        "running": running,
        "steps": steps,
        "finished": finished,
        "tokens_per_step": round(tokens / steps, 1),
        "step_ms_mean": round(statistics.mean(steady) * 1e3, 3),
        "step_ms_p50": round(statistics.median(steady) * 1e3, 3),
        "step_ms_p99": round(sorted(steady)[int(0.99 * (len(steady) - 1))] * 1e3, 3),
        "step_cpu_ms_mean": round(statistics.mean(steady_cpu) * 1e3, 3),
    }
    if prefixes:
        res["prefixes"] = prefixes
        res["prefix_hit_rate"] = round(lookups["hits"] / max(1, lookups["tokens"]), 4)
        res["prefix_lookups"] = lookups["requests"]
    if mode == "kvcached":
        stats = pool.kv.stats()
        from kvcached.integrations.vllm import runtime

        kv = runtime.worker_kv()
        res["sync_maps"] = stats.num_sync_maps
        res["sync_maps_steady"] = syncs[-1] - syncs[len(syncs) // 4]
        res["maps"] = stats.num_pages_mapped_total
        res["in_control_plane"] = kv is not None and kv.handle is not None
        res["moved_blocks"] = moved
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vllm-tests", required=True, help="vLLM's source tree holding tests/v1/core/utils.py")
    ap.add_argument("--running", default="16,1024", help="requests in flight, comma separated")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--num-blocks", type=int, default=64 * 1024, help="8B on an H200 at 0.9: ~64k blocks")
    ap.add_argument("--blocks-per-page", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=2, help="alternating runs of each configuration")
    ap.add_argument("--prefixes", type=int, default=0, help="shared 128-token prompt prefixes (0: distinct prompts)")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: mode:running in this process
    args = ap.parse_args()
    sys.path.insert(0, args.vllm_tests)
    if args.one:
        mode, running = args.one.split(":")
        print(json.dumps(measure(mode, int(running), args.steps, args.num_blocks, args.blocks_per_page, args.prefixes)), flush=True)
        return 0
    results = []
    for running in (int(r) for r in args.running.split(",")):
        for _ in range(args.repeat):
            for mode in ("vanilla", "kvcached"):
                cmd = [sys.executable, __file__, "--vllm-tests", args.vllm_tests, "--steps", str(args.steps),
                       "--num-blocks", str(args.num_blocks), "--blocks-per-page", str(args.blocks_per_page),
                       "--prefixes", str(args.prefixes), "--one", f"{mode}:{running}"]
                line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
                results.append(json.loads(line))
                print(line, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
