"""Helpers the GPU check scripts share (vLLM and SGLang): start and stop a server, wait
for /health, call it over HTTP, read ``kvctl ls --json``, and import a module list.

Imported by ``scripts/gpu/*.py`` and ``scripts/gpu/sglang/*.py`` with ``scripts/gpu`` put
on ``sys.path``; standard library only (the GPU machine's Python runs it).
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import time
import traceback
import urllib.request
from collections import defaultdict
from collections.abc import Sequence
from typing import Any


def http(method: str, url: str, body: dict | None = None, timeout: float = 300) -> Any:
    """The JSON answer (None when empty, ``{"raw": text}`` when not JSON)."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data, {"Content-Type": "application/json"}, method=method)
    with urllib.request.urlopen(req, timeout=timeout) as r:
        text = r.read().decode(errors="replace").strip()
    if not text:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return {"raw": text}


def wait_healthy(base: str, proc: subprocess.Popen, limit_s: float) -> float:
    """Seconds until ``base``/health answers 200; raises if the server exits or is late."""
    t0 = time.time()
    while time.time() - t0 < limit_s:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before it became healthy")
        try:
            with urllib.request.urlopen(base + "/health", timeout=2) as r:
                if r.status == 200:
                    return time.time() - t0
        except OSError:
            pass
        time.sleep(1)
    raise RuntimeError(f"server not healthy after {limit_s:.0f} s")


def start(cmd: list[str], env: dict, log_path: str) -> subprocess.Popen:
    """Start ``cmd`` in its own process group, output to ``log_path``."""
    with open(log_path, "w") as log:  # the child keeps its own descriptor
        return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the process group, SIGKILL after 60 s."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def kvctl_ls(env: dict) -> dict:
    """``kvctl ls --json`` (``{"error": ...}`` when it fails)."""
    proc = subprocess.run(["kvctl", "ls", "--json"], capture_output=True, text=True, env=env, timeout=30)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip()}
    return json.loads(proc.stdout)


def engine_row(listing: dict, name: str) -> dict | None:
    return next((e for e in listing.get("engines") or [] if e.get("name") == name), None)


def engine_mapped(listing: dict, name: str) -> int | None:
    row = engine_row(listing, name)
    return None if row is None else int(row["mapped_bytes"])


def import_all(package: str, modules: Sequence[str], verbose: bool = False,
               failures: dict[str, list[str]] | None = None, others: list[tuple[str, str]] | None = None) -> bool:
    """Import ``modules``, then print the package's version, what is missing (by top-level
    package), what raised, and ``N/M modules imported``. True when all imported."""
    failures = defaultdict(list, failures or {})
    others = list(others or [])
    for name in modules:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            failures[(e.name or "?").split(".")[0]].append(name)
            if verbose:
                traceback.print_exc()
        except Exception as e:
            others.append((name, f"{type(e).__name__}: {e}".splitlines()[0][:300]))
            if verbose:
                traceback.print_exc()
    pkg = importlib.import_module(package)
    print(f"{package} {pkg.__version__} from {os.path.dirname(pkg.__file__ or '')}")
    for top, mods in sorted(failures.items()):
        print(f"MISSING {top}: needed by {', '.join(mods[:4])}{' ...' if len(mods) > 4 else ''}")
    for name, msg in others:
        print(f"ERROR {name}: {msg}")
    ok = len(modules) - sum(map(len, failures.values())) - len(others)
    print(f"{ok}/{len(modules)} modules imported")
    return not failures and not others
