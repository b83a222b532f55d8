"""kvctl limit / budget / set / rebalance change what real engines do."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time

import pytest
from cli_helpers import MiB, kvctl_cmd, read_status, standin_cmd, start, wait_for

from kvcached.control import Controller
from kvctl.listing import engine_state


def snapshot(shm_name):
    with Controller.open(shm_name) as c:
        return c.snapshot()


def test_limit_is_applied_by_the_engine(kvctl, engines, shm_name):
    a = engines("alpha", alloc=16)
    result = kvctl("limit", "alpha", "8MiB")
    assert result.exit_code == 0, result.output
    first, second = result.output.splitlines()
    assert first == "alpha: limit none -> 8 MiB (revision 2)"
    assert second.startswith("alpha: applied in ")
    assert a.dp.pool.limit_bytes == 8 * MiB  # the pool itself took it
    assert a.dp.pool.stats().mapped_bytes <= 8 * MiB
    info = snapshot(shm_name).engine("alpha")
    assert info.applied_revision == 2 and info.applied_limit_bytes == 8 * MiB


def test_limit_percent_none_and_no_wait(kvctl, engines, shm_name):
    a = engines("alpha", alloc=4)
    capacity = snapshot(shm_name).gpus[0].capacity_bytes
    assert kvctl("limit", "alpha", "25%").exit_code == 0
    assert a.dp.pool.limit_bytes == capacity // 4
    result = kvctl("limit", "alpha", "none", "--wait", "0")
    assert result.exit_code == 0
    assert result.output.splitlines() == [f"alpha: limit {_fmt(capacity // 4)} -> none (revision 3)"]
    wait_for(lambda: a.dp.pool.limit_bytes is None, what="the engine to drop its limit")


def test_limit_below_live_blocks_says_so(kvctl, engines):
    a = engines("alpha", alloc=100)  # 12.5 MiB of live blocks
    result = kvctl("limit", "alpha", "4MiB")
    assert result.exit_code == 0
    assert "grants no new blocks until it is under the limit" in result.output
    assert a.dp.pool.alloc(1) is None  # observable: the pool refuses


@pytest.mark.multiproc
def test_limit_times_out_on_a_stopped_engine(kvctl, shm_name, tmp_path):
    status = str(tmp_path / "status.json")
    proc = start(standin_cmd(status), env={**os.environ, "KVCACHED_ENGINE_NAME": "frozen"})
    try:
        wait_for(lambda: (read_status(status) or {}).get("ready"), what="the stand-in engine")
        os.kill(proc.pid, signal.SIGSTOP)
        result = kvctl("limit", "frozen", "8MiB", "--wait", "0.3")
        assert result.exit_code == 1
        assert "frozen: limit none -> 8 MiB (revision 2)" in result.stdout
        assert "has not applied revision 2 within 0.3 s" in result.stderr
        stalled = dataclasses.replace(snapshot(shm_name).engine("frozen"), heartbeat_age_s=2.5)
        assert engine_state(stalled) == "running,stalled"  # what ls and top show after 2 s
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        proc.terminate()
        proc.wait(10)


def test_budget_by_index_uuid_and_percent(kvctl, engines, shm_name):
    engines("alpha", alloc=8)
    gpu = snapshot(shm_name).gpus[0]
    result = kvctl("budget", "0", "64MiB")
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"GPU 0 ({gpu.uuid}): budget none -> 64 MiB"
    assert snapshot(shm_name).gpus[0].budget_bytes == 64 * MiB
    assert kvctl("budget", gpu.uuid[:12], "50%").exit_code == 0
    assert snapshot(shm_name).gpus[0].budget_bytes == gpu.total_bytes // 2
    assert kvctl("budget", "0", "none").exit_code == 0
    assert snapshot(shm_name).gpus[0].budget_bytes is None


def test_budget_refuses_maps_beyond_it(kvctl, engines):
    a = engines("alpha", alloc=8)
    mapped = a.dp.pool.stats().mapped_bytes
    result = kvctl("budget", "0", f"{mapped}")
    assert result.exit_code == 0
    # Everything mapped is taken or reserve; asking for more than that must be refused.
    assert a.dp.pool.alloc(a.dp.pool.stats().free_bytes // a.dp.block_bytes + 64) is None


def test_set_weight_and_min(kvctl, engines, shm_name):
    engines("alpha")
    result = kvctl("set", "alpha", "--weight", "2.5", "--min", "16MiB")
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "alpha: weight 2.5, min 16 MiB"
    info = snapshot(shm_name).engine("alpha")
    assert info.weight == 2.5 and info.min_bytes == 16 * MiB


def test_rebalance_dry_run_then_real(kvctl, engines, shm_name):
    engines("alpha", alloc=200)
    engines("beta", alloc=8)
    assert kvctl("budget", "0", "128MiB").exit_code == 0
    dry = kvctl("rebalance", "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert "OLD LIMIT" in dry.output and "NEW LIMIT" in dry.output
    assert "2 limit(s) would change (dry run: nothing set)" in dry.output
    assert all(e.limit_bytes is None for e in snapshot(shm_name).engines)
    real = kvctl("rebalance", "--policy", "equal", "--json")
    assert real.exit_code == 0
    data = json.loads(real.output)
    assert data["dry_run"] is False
    limits = {c["name"]: c["new_limit_bytes"] for c in data["changes"]}
    assert limits == {"alpha": 64 * MiB, "beta": 64 * MiB}
    assert {e.name: e.limit_bytes for e in snapshot(shm_name).engines} == limits


@pytest.mark.multiproc
def test_rebalance_watch_until_ctrl_c(engines, shm_name):
    engines("alpha", alloc=8)
    proc = start(kvctl_cmd("rebalance", "--watch", "--interval", "0.1", "--policy", "equal"))
    try:
        wait_for(lambda: snapshot(shm_name).engine("alpha").limit_bytes is not None, what="the first round")
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "1 limit(s) changed" in out
    assert err == ""


def _fmt(num_bytes):
    from kvcached.control import format_bytes

    return format_bytes(num_bytes)
