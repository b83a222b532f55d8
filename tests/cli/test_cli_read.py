"""kvctl ls / top / doctor against real engines in the test's own segment."""

from __future__ import annotations

import json
from typing import Any

import pytest
from cli_helpers import wait_for

from kvcached.control import Controller


def _snapshot(shm_name: str) -> Any:
    with Controller.open(shm_name) as c:
        return c.snapshot()


def _settled(shm_name: str, engines: Any) -> Any:
    """Wait until every engine's slot shows what its pool holds (the watcher runs every 20 ms)."""

    def check() -> Any:
        snap = _snapshot(shm_name)
        by_name = {e.name: e for e in snap.engines}
        ok = all(by_name[e.name].used_bytes == e.dp.pool.stats().used_bytes for e in engines)
        return snap if ok else None

    return wait_for(check, what="slots to match the pools")


def test_ls_shows_every_engine_and_gpu(kvctl, engines, shm_name):
    a, b = engines("alpha", alloc=40), engines("beta", alloc=3)
    snap = _settled(shm_name, [a, b])
    result = kvctl("ls")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == f"segment {shm_name}"
    assert any(line.startswith("  0  host-") for line in lines)
    alpha = next(line for line in lines if line.startswith("alpha "))
    assert "test/model" in alpha and "running" in alpha and "none" in alpha
    assert "5 MiB" in alpha  # 40 blocks of 128 KiB
    assert any(line.startswith("beta ") for line in lines)
    assert snap.gpus[0].num_engines == 2


def test_ls_json_matches_the_pools(kvctl, engines, shm_name):
    a = engines("alpha", alloc=24)
    _settled(shm_name, [a])
    result = kvctl("ls", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["segment"] == shm_name
    (engine,) = data["engines"]
    stats = a.dp.pool.stats()
    assert engine["name"] == "alpha" and engine["kind"] == "other" and engine["state"] == "running"
    assert engine["used_bytes"] == stats.used_bytes == 24 * 128 * 1024
    assert engine["mapped_bytes"] == a.dp.arena.mapped_bytes
    assert engine["limit_bytes"] is None
    assert data["gpus"][0]["mapped_bytes"] == engine["mapped_bytes"]


def test_ls_with_no_engines_left(kvctl, engines, shm_name):
    e = engines("gone")
    e.handle.close()
    result = kvctl("ls")
    assert result.exit_code == 0
    assert "no engines registered" in result.output


def test_top_once_draws_budget_bar_and_engines(kvctl, engines, shm_name):
    a, b = engines("alpha", alloc=64), engines("beta", alloc=8)
    _settled(shm_name, [a, b])
    assert kvctl("budget", "0", "128MiB").exit_code == 0
    result = kvctl("top", "--once")
    assert result.exit_code == 0, result.output
    out = result.output
    assert "budget 128 MiB" in out
    assert "alpha" in out and "beta" in out
    assert "[" in out and "·" in out  # the GPU bar with free space
    assert "q quit" not in out  # no key help where no keys are read


def test_top_json_has_rates(kvctl, engines, shm_name):
    a = engines("alpha", alloc=4)
    _settled(shm_name, [a])
    result = kvctl("top", "--json", "--interval", "0.2")
    assert result.exit_code == 0, result.output
    (engine,) = json.loads(result.output)["engines"]
    assert engine["allocs_per_s"] >= 0 and engine["denied_per_s"] >= 0


def test_top_sort_keys(kvctl, engines, shm_name):
    a, b = engines("alpha", alloc=2), engines("beta", alloc=60)
    _settled(shm_name, [a, b])
    out = kvctl("top", "--once", "--sort", "name").output
    assert out.index("alpha") < out.rindex("beta")
    bad = kvctl("top", "--once", "--sort", "colour")
    assert bad.exit_code == 1
    assert "allowed are mapped, name" in bad.stderr


def test_doctor_on_this_machine(kvctl, engines, shm_name):
    engines("alpha")
    result = kvctl("doctor")
    assert result.exit_code == 0, result.output
    assert "host backend" in result.output and "usable" in result.output
    assert f"{shm_name}: 1 GPU" in result.output
    data = json.loads(kvctl("doctor", "--json").output)
    assert data["ok"] is True
    assert {c["name"] for c in data["checks"]} >= {
        "compiled core",
        "host backend",
        "cuda backend",
        "vllm",
        "sglang",
        "segment",
    }


def test_doctor_fails_on_an_unsupported_engine_version(kvctl, monkeypatch):
    from kvcached.integrations import versions

    span = versions.SUPPORTED["vllm"]
    too_old = "0.19.2"
    assert too_old not in span
    real = versions.installed_version
    monkeypatch.setattr(versions, "installed_version", lambda d: too_old if d == "vllm" else real(d))
    result = kvctl("doctor")
    assert result.exit_code == 1
    line = next(line for line in result.output.splitlines() if "vllm" in line)
    assert line.startswith("[FAIL]") and f"{too_old} is not supported" in line and str(span) in line


def test_doctor_fails_on_a_bad_variable(kvctl, monkeypatch):
    monkeypatch.setenv("KVCACHED_PAGE_SIZE", "lots")
    result = kvctl("doctor")
    assert result.exit_code == 1
    assert "KVCACHED_PAGE_SIZE='lots' is invalid" in result.output


def test_version_ranges():
    from kvcached.integrations.versions import SUPPORTED, VersionRange, parse_version

    assert parse_version("0.26.0+cu128") == (0, 26)
    assert parse_version("0.5.11") == (0, 5, 11)
    span = VersionRange("0.20.0", "0.33.0")
    assert "0.20.0" in span and "0.33.0" in span and "0.26.1rc2" in span and "v0.21" in span
    assert "0.19.9" not in span and "0.33.1" not in span and "garbage" not in span and None not in span
    for name, supported in SUPPORTED.items():
        assert name in ("vllm", "sglang")
        assert all(span.low in supported and span.high in supported for span in supported.ranges)
    sglang = SUPPORTED["sglang"]
    assert "0.5.17" in sglang and "0.5.23" in sglang and "0.5.20" not in sglang  # no patches for 0.5.18-0.5.22
    assert str(sglang) == "0.5.17 and 0.5.23" and str(SUPPORTED["vllm"]) == "0.26.0–0.34.0"


def test_a_torch_kvpool_engine(kvctl, shm_name):
    """The real KVPool (torch tensors over the arena) as an engine: listed, limited, written."""
    torch = pytest.importorskip("torch")
    from kvcached.control import attach_engine
    from kvcached.demo.pool import ModelShape, build_pool

    dp = build_pool(ModelShape(), "host", 64 << 20, 64 << 20, tensors=True)
    handle = attach_engine(
        dp.pool, "tensors", "t/m", "other", shm_name, arena=dp.arena, backend=dp.backend, headroom_bytes=0
    )
    try:
        ids = dp.alloc(20)
        assert ids is not None
        layer0 = dp.pool.kv_tensors[0]
        assert layer0.dtype == torch.float16 and layer0.shape[1] == dp.pool.num_blocks
        assert bool((layer0[:, ids] != 0).all())  # the demo pool wrote the new blocks
        wait_for(lambda: _snapshot(shm_name).engine("tensors").used_bytes == 20 * dp.block_bytes, what="the slot")
        assert "tensors" in kvctl("ls").output
        assert kvctl("limit", "tensors", "4MiB").exit_code == 0
        assert dp.pool.limit_bytes == 4 << 20
    finally:
        handle.close()
        dp.close()


@pytest.mark.multiproc
def test_top_batch_mode_prints_frames_until_ctrl_c(engines, shm_name):
    import signal
    import subprocess

    from cli_helpers import kvctl_cmd

    engines("alpha", alloc=4)
    proc = subprocess.Popen(
        kvctl_cmd("top", "--interval", "0.2"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        headers = 0
        while headers < 2:
            headers += proc.stdout.readline().startswith("kvctl top")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0 and err == ""


@pytest.mark.multiproc
@pytest.mark.parametrize("end", ["q", "SIGTERM"])
def test_top_live_on_a_terminal_sorts_and_quits_on_keys(engines, shm_name, end):
    """Full-screen mode in a real pseudo-terminal: keys work and the terminal is restored."""
    import fcntl
    import os
    import pty
    import select
    import struct
    import subprocess
    import termios
    import time

    from cli_helpers import kvctl_cmd

    engines("alpha", alloc=4)
    engines("beta", alloc=40)
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 130, 0, 0))
    before = termios.tcgetattr(slave)
    proc = subprocess.Popen(kvctl_cmd("top", "--interval", "0.2"), stdin=slave, stdout=slave, stderr=slave)
    screen = b""

    def read_until(needle: bytes, timeout_s: float = 20.0) -> None:
        nonlocal screen
        deadline = time.monotonic() + timeout_s
        while needle not in screen:
            assert time.monotonic() < deadline, f"no {needle!r} in {screen[-400:]!r}"
            if select.select([master], [], [], 0.1)[0]:
                screen += os.read(master, 65536)

    try:
        for needle in (b"sort mapped", b"alpha", b"beta"):
            read_until(needle)
        os.write(master, b"s")
        read_until(b"sort name")
        if end == "q":
            os.write(master, b"q")
        else:
            proc.terminate()
        assert proc.wait(timeout=20) == 0
        assert termios.tcgetattr(slave) == before  # cbreak mode undone
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
        os.close(slave)
