#!/usr/bin/env python3
"""Compaction on the GPU: moved blocks keep their KV data, so greedy outputs do not change.

Run on the GPU machine after scripts/gpu/stage_vllm.sh and the kvcached install (as
scripts/bench_serving/gpu_call.sh prepares them):

    python3 scripts/gpu/compaction_check.py --model /tmp/llama8b --weights /tmp/llama4l --out $OUT

One batch of requests (random prompts of 100-600 tokens; most stop after 16 tokens, a
quarter run to 320) is generated greedily in a fresh vLLM process (offline ``LLM``,
engine core in-process, dummy weights, eager) per configuration:

* ``off``: kvcached with ``KVCACHED_COMPACT=off``;
* ``on``: the same with compaction forced on (the short requests leave the long ones
  scattered over page groups, so blocks move while they decode);
* ``nocopy`` (the control): compaction on but the block copies dropped, the rows still
  rewritten — logprobs must change, or the check could not see a lost copy (greedy
  tokens of random weights barely depend on the context: they did not change).

for Model Runner V2 (vLLM 0.26's default for Llama) and the V1 runner. Exit 0 when "on"
matches "off" token for token and logprob for logprob with blocks moved, and "nocopy" differs, for both runners.
Writes $OUT/compaction_check.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time

NUM_REQUESTS = 96


def workload(seed: int = 0) -> tuple[list[list[int]], list[int]]:
    rng = random.Random(seed)
    prompts = [[rng.randrange(1000, 100000) for _ in range(rng.randrange(100, 600))] for _ in range(NUM_REQUESTS)]
    max_tokens = [320 if i % 4 == 0 else 16 for i in range(NUM_REQUESTS)]
    return prompts, max_tokens


def write_random_model(src: str, dst: str, layers: int = 4) -> None:
    """``dst``: ``src``'s config and tokenizer with ``layers`` layers and real weights drawn
    as a fresh model's (normal, std ``initializer_range``), so attention moves the logits.
    vLLM's dummy weights (uniform ±1e-3) leave attention below bf16's resolution: with them
    the output does not depend on what the KV cache holds, and a lost copy cannot show."""
    if os.path.exists(os.path.join(dst, "model.safetensors")):  # before the imports: they take ~15 s
        return
    import shutil

    import torch
    from transformers import AutoConfig, LlamaForCausalLM

    os.makedirs(dst, exist_ok=True)
    for name in os.listdir(src):
        if name != "config.json" and os.path.isfile(os.path.join(src, name)):
            shutil.copy(os.path.join(src, name), dst)
    config = AutoConfig.from_pretrained(src)
    config.num_hidden_layers = layers
    config.tie_word_embeddings = True  # one 128k x 4096 matrix, not two
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(dst, safe_serialization=True, max_shard_size="20GB")


def child(model: str, mode: str, result_path: str) -> None:
    """One configuration, in this (fresh) process."""
    from kvcached.integrations.vllm import compaction, runtime

    moved = {"blocks": 0, "steps": 0}
    before_step = compaction.before_step

    def counting(scheduler):  # the scheduler patch calls compaction.before_step by name
        moves = before_step(scheduler)
        if moves is not None:
            moved["blocks"] += len(moves.pairs)
            moved["steps"] += 1
        return moves

    compaction.before_step = counting
    if mode == "nocopy":
        def attach(output, moves):  # rows rewritten, bytes not copied
            output.kvcached_moves = moves

        compaction.attach = attach

    from vllm import LLM, SamplingParams

    weights = "auto" if os.path.exists(os.path.join(model, "model.safetensors")) else "dummy"
    llm = LLM(model=model, load_format=weights, enforce_eager=True, max_model_len=2048, seed=0,
              enable_prefix_caching=True)
    prompts, max_tokens = workload()
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, logprobs=0) for n in max_tokens]
    t0 = time.time()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    took = time.time() - t0
    kv = runtime.worker_kv()
    stats = kv.pages.stats() if kv is not None and kv.pages is not None else None
    with open(result_path, "w") as f:
        json.dump({
            "mode": mode, "runner": "v2" if os.environ.get("VLLM_USE_V2_MODEL_RUNNER") == "1" else "v1",
            "tokens": [list(o.outputs[0].token_ids) for o in outs],
            # The sampled tokens' logprobs: any change in what attention read shows here, where
            # a random-weight model's argmax may not move.
            "logprobs": [[lp[t].logprob for t, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs, strict=True)]
                         for o in outs],
            "moved_blocks": moved["blocks"],
            "moving_steps": moved["steps"], "generate_s": round(took, 2),
            "rewrites_blocks": bool(kv is not None and kv.rewrites_blocks),
            "mapped_mib_after": None if stats is None else stats.mapped_bytes >> 20,
        }, f)


def max_delta(a: dict, b: dict) -> float:
    """The largest logprob difference over each request's positions up to and including the
    first where the two runs sampled different tokens (to there both followed the same context;
    after it, the contexts differ and so may everything)."""
    worst = 0.0
    for ta, tb, la, lb in zip(a["tokens"], b["tokens"], a["logprobs"], b["logprobs"], strict=True):
        for xa, xb, pa, pb in zip(ta, tb, la, lb, strict=False):
            worst = max(worst, abs(pa - pb))
            if xa != xb:
                break
    return worst


def verdict(off: dict, on: dict, nocopy: dict) -> tuple[bool, str]:
    """Whether one runner's three runs show the copy at work, and the line that says so.

    It passes only when compaction moved blocks and changed nothing (tokens and logprobs of
    every request equal to the run without it), and the control moved blocks too and did
    change something: a control that changes nothing means this model cannot show a lost copy.
    """
    if any("tokens" not in r for r in (off, on, nocopy)):
        return False, "FAIL: a run failed"
    n = len(off["tokens"])
    same = sum(x == y for x, y in zip(off["logprobs"], on["logprobs"], strict=True))
    differ = sum(x != y for x, y in zip(off["logprobs"], nocopy["logprobs"], strict=True))
    why = []
    if off["tokens"] != on["tokens"] or same < n:
        why.append("compaction changed the output")
    if on["moved_blocks"] == 0:
        why.append("no block moved")
    if nocopy["moved_blocks"] == 0:
        why.append("the control moved no block")
    elif differ == 0:
        why.append("the control changed nothing, so a lost copy could not show")
    head = "PASS" if not why else f"FAIL ({'; '.join(why)})"
    return not why, (f"{head}: tokens and logprobs on = off for {same}/{n} requests ({on['moved_blocks']} blocks "
                     f"moved, max |dlogprob| {max_delta(off, on):.3g}); without the copy {differ} differ "
                     f"(max |dlogprob| {max_delta(off, nocopy):.3g})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="a model folder (scripts/gpu/make_model.py)")
    ap.add_argument("--weights", metavar="DIR",
                    help="write a 4-layer copy of --model with real random weights to DIR and check with it")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/out"))
    ap.add_argument("--runners", default="v2,v1", help="which model runners, of v2 and v1 (default both)")
    ap.add_argument("--child", choices=("off", "on", "nocopy"), help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.model, a.child, a.result)
        return 0
    try:  # what every child's engine imports first: fail here, not after a minute of start-up per child
        import kvcached.control  # noqa: F401
    except ImportError as e:
        print(f"compaction_check: kvcached cannot run here ({e}); stage the payload and install kvcached first")
        return 2
    os.makedirs(a.out, exist_ok=True)
    if a.weights:
        t0 = time.time()
        write_random_model(a.model, a.weights)
        print(f"model with random weights in {a.weights} ({time.time() - t0:.0f} s)")
        a.model = a.weights
    work = "/tmp/compaction_runs"  # per-run results and logs; $OUT gets the summary (its file limit)
    os.makedirs(work, exist_ok=True)
    runs: dict[str, dict] = {}
    runners = [r for r in a.runners.split(",") if r]
    if not runners or any(r not in ("v1", "v2") for r in runners):
        ap.error(f"--runners takes v1 and/or v2, got {a.runners!r}")
    for runner in runners:
        v2 = "1" if runner == "v2" else "0"
        for mode in ("off", "on", "nocopy"):
            name = f"{runner}-{mode}"
            path = os.path.join(work, f"{name}.json")
            log = os.path.join(work, f"{name}.log")
            # Set before the child starts: kvcached's import hook reads them at interpreter start.
            env = dict(os.environ, VLLM_USE_V2_MODEL_RUNNER=v2, ENABLE_KVCACHED="true", KVCACHED_AUTOPATCH="1",
                       KVCACHED_PACK="on", KVCACHED_COMPACT="off" if mode == "off" else "on",
                       VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_USE_FLASHINFER_SAMPLER="0")  # flashinfer is not staged
            t0 = time.time()
            crashes = []
            # A child killed by a signal gets one more try, recorded: the tenth lease saw 2 of 12
            # starts abort at warm-up ("terminate called without an active exception", SIGABRT),
            # both with compaction off.
            for _ in range(2):
                with open(log, "w") as f:
                    rc = subprocess.run([sys.executable, os.path.abspath(__file__), "--model", a.model, "--child", mode,
                                         "--result", path], env=env, stdout=f, stderr=subprocess.STDOUT).returncode
                if rc == 0 and os.path.exists(path):
                    break
                with open(log) as f:
                    tail = f.readlines()[-30:]
                print(f"[{name}] exited {rc} after {time.time() - t0:.0f} s; tail of {log}:\n{''.join(tail[-8:])}")
                crashes.append({"rc": rc, "log_tail": tail})
                if rc >= 0:  # an error exit (a traceback) would only repeat; a signal may not
                    break
            if rc != 0 or not os.path.exists(path):
                runs[name] = {"rc": rc, "crashes": crashes}
                continue
            with open(path) as f:
                runs[name] = json.load(f)
            r = runs[name]
            r["crashes"] = crashes
            print(f"[{name}] {time.time() - t0:.0f} s: generate {r['generate_s']} s, moved {r['moved_blocks']} blocks "
                  f"in {r['moving_steps']} steps, worker rewrites {r['rewrites_blocks']}, mapped after {r['mapped_mib_after']} MiB")
    ok = True
    summary = {}
    for runner in runners:
        passed, summary[runner] = verdict(*(runs.get(f"{runner}-{m}", {}) for m in ("off", "on", "nocopy")))
        ok &= passed
        print(f"{runner}: {summary[runner]}")
    with open(os.path.join(a.out, "compaction_check.json"), "w") as f:
        json.dump({"summary": summary, "runs": {k: {kk: vv for kk, vv in v.items() if kk not in ("tokens", "logprobs")}
                                                  for k, v in runs.items()}}, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
