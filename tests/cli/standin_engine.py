"""A stand-in for a serving engine, for ``kvctl launch`` tests.

Registers a real KV pool (the demo's pool on the host backend; ``--tensors`` for a torch
``KVPool``) under ``KVCACHED_ENGINE_NAME`` with ``KVCACHED_LIMIT``, takes ``--alloc``
blocks, writes a JSON status file (pid, process group, the kvcached environment it saw)
and idles. On SIGINT/SIGTERM it appends the signal to the status file and exits with
``--exit-code``; ``--exit-after`` makes it exit by itself. ``--crash`` makes it SIGKILL
itself once ready (its slot is left behind), ``--leave-child`` leaves a sleeping child
process in its group.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

ENV_KEYS = (
    "ENABLE_KVCACHED",
    "KVCACHED_AUTOPATCH",
    "KVCACHED_ENGINE_NAME",
    "KVCACHED_LIMIT",
    "KVCACHED_SHM_NAME",
    "CUDA_VISIBLE_DEVICES",
)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--status", required=True)
    parser.add_argument("--alloc", type=int, default=8)
    parser.add_argument("--exit-code", type=int, default=0)
    parser.add_argument("--exit-after", type=float, default=0.0)
    parser.add_argument("--tensors", action="store_true")
    parser.add_argument("--crash", action="store_true")
    parser.add_argument("--leave-child", action="store_true")
    args = parser.parse_args()

    from kvcached.control import attach_engine
    from kvcached.demo.pool import ModelShape, build_pool

    received: list[str] = []

    def write_status(**extra: object) -> None:
        status = {
            "pid": os.getpid(),
            "pgid": os.getpgid(0),
            "env": {k: os.environ.get(k) for k in ENV_KEYS},
            "signals": received,
            **extra,
        }
        tmp = args.status + ".tmp"
        with open(tmp, "w") as f:
            json.dump(status, f)
        os.replace(tmp, args.status)

    def on_signal(signum: int, frame: object) -> None:
        received.append(signal.Signals(signum).name)
        write_status()
        raise SystemExit(args.exit_code)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    dp = build_pool(ModelShape(), "host", 64 << 20, 64 << 20, tensors=args.tensors)
    handle = attach_engine(
        dp.pool,
        os.environ.get("KVCACHED_ENGINE_NAME") or "standin",
        "standin/model",
        "other",
        arena=dp.arena,
        backend=dp.backend,
        headroom_bytes=0,
    )
    try:
        blocks = dp.alloc(args.alloc) if args.alloc else []
        child = subprocess.Popen(["sleep", "60"]).pid if args.leave_child else None
        write_status(ready=True, child=child, num_blocks=len(blocks or []))
        if args.crash:
            os.kill(os.getpid(), signal.SIGKILL)
        deadline = time.monotonic() + args.exit_after if args.exit_after else None
        while deadline is None or time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        handle.close()
        dp.close()
    return args.exit_code


if __name__ == "__main__":
    sys.exit(main())
