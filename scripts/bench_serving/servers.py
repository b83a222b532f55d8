"""The servers a serving benchmark runs against: their command lines, processes and health.

``serve_cmd`` builds a ``vllm serve`` command line (or the stand-in ``fake_server.py``'s for
a rehearsal without a GPU); ``start_server`` launches it in its own process group with its
log in the output directory; ``wait_healthy``, ``warm_up`` and ``stop_servers`` take a set
of them through a call.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from client import run_in_processes
from workload import ConstantRate, build_requests


@dataclass
class Server:
    name: str
    port: int
    proc: subprocess.Popen[bytes]
    log: str
    kv_bytes: int | None = None  # the static slice, if any

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"



def base_env() -> dict[str, str]:
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        VLLM_NO_USAGE_STATS="1",
        PYTHONUNBUFFERED="1",
        VLLM_USE_FLASHINFER_SAMPLER="0",
    )  # flashinfer is not staged
    env.pop("ENABLE_KVCACHED", None)
    return env


def serve_cmd(args: argparse.Namespace, name: str, port: int, extra: list[str]) -> list[str]:
    if args.fake:  # rehearsal without a GPU: the stand-in server, capacity ~ its KV slice
        return [
            sys.executable,
            str(Path(__file__).with_name("fake_server.py")),
            "--port",
            str(port),
            "--model",
            name,
            "--max-running",
            str(args.fake_max_running),
            "--tpot-ms",
            "5",
        ]
    return [
        sys.executable,
        "-m",
        "vllm.entrypoints.cli.main",
        "serve",
        args.model,
        "--load-format",
        "dummy",
        "--attention-backend",
        "TRITON_ATTN",
        "--max-model-len",
        str(args.max_model_len),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--served-model-name",
        name,
        "--seed",
        "0",
        "--disable-uvicorn-access-log",
        *extra,
        *args.extra.split(),
    ]


def start_server(
    servers: list[Server],
    out_dir: str,
    name: str,
    port: int,
    cmd: list[str],
    env: dict[str, str],
    kv_bytes: int | None = None,
    log_name: str | None = None,
) -> Server:
    """Launch ``cmd`` as server ``name`` (its own process group, output to a log in
    ``out_dir``) and add it to ``servers``."""
    log = os.path.join(out_dir, log_name or f"server_{name}.log")
    with open(log, "w") as f:  # the child keeps its own descriptor
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    server = Server(name, port, proc, log, kv_bytes)
    servers.append(server)
    return server


def wait_healthy(servers: list[Server], limit_s: float) -> float:
    t0, pending = time.time(), list(servers)
    while pending:
        if time.time() - t0 > limit_s:
            raise RuntimeError(f"not healthy after {limit_s:.0f} s: {[s.name for s in pending]}")
        for s in list(pending):
            if s.proc.poll() is not None:
                tail = Path(s.log).read_text(errors="replace")[-3000:]
                raise RuntimeError(f"server {s.name} exited with {s.proc.returncode}:\n{tail}")
            try:
                with urllib.request.urlopen(s.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        pending.remove(s)
            except OSError:
                pass
        time.sleep(1)
    return time.time() - t0


def stop_servers(servers: list[Server]) -> None:
    """SIGTERM every server's process group, SIGKILL what is still up after 45 s; empties ``servers``."""
    for s in servers:
        if s.proc.poll() is None:
            os.killpg(s.proc.pid, signal.SIGTERM)
    for s in servers:
        try:
            s.proc.wait(45)
        except subprocess.TimeoutExpired:
            os.killpg(s.proc.pid, signal.SIGKILL)
            s.proc.wait()
    servers.clear()


def warm_up(servers: list[Server]) -> None:
    """A few short requests per server, so first-request effects stay out of the runs."""
    warm = [
        r
        for i, s in enumerate(servers)
        for r in build_requests(ConstantRate([s.name], 8.0, 1.0), seed=1000 + i, output_len=32)
    ]
    run_in_processes(warm, {s.name: s.url for s in servers}, timeout_s=120)
