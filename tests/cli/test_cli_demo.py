"""kvctl demo end to end (real engine processes) and its parts (streams, scheduler, summary)."""

from __future__ import annotations

import json
import os
import re
import signal

import pytest
from cli_helpers import kvctl_cmd, pid_alive, start, wait_for

from kvcached.control import Controller
from kvcached.demo.scheduler import Scheduler, StaticBlocks
from kvcached.demo.workload import Workload, arrivals, rate_at

SEGMENT_RE = re.compile(r"segment (kvcached-demo-[0-9]+-[0-9a-f]+)")


def shm_exists(name):
    return os.path.exists(f"/dev/shm/{name}")


@pytest.mark.multiproc
def test_short_demos_run_side_by_side_and_leave_nothing():
    """Two demos at once (text and JSON): both finish, neither sees the other, no segment stays."""
    text = start(kvctl_cmd("demo", "--duration", "3", "--interval", "0.5"))
    js = start(kvctl_cmd("demo", "--duration", "3", "--engines", "1", "--json"))
    (out, err), (out_js, err_js) = text.communicate(timeout=90), js.communicate(timeout=90)
    assert text.returncode == 0, err
    assert js.returncode == 0, err_js
    segment = SEGMENT_RE.search(out).group(1)
    lines = out.splitlines()
    assert any(line.startswith("[  ") and "demo-1" in line and "demo-3" in line for line in lines)
    assert "STATIC w/r" in out and "A static split of the same 384 MiB" in out.replace("\n", " ")
    summary = json.loads(out_js)
    assert [e["name"] for e in summary["engines"]] == ["demo-1"] and summary["engines"][0]["peak_need_bytes"] > 0
    assert not shm_exists(segment)
    assert [
        p for p in os.listdir("/dev/shm") if p.startswith((f"kvcached-demo-{text.pid}-", f"kvcached-demo-{js.pid}-"))
    ] == []
    assert "Traceback" not in err + err_js


@pytest.mark.multiproc
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_ends_the_demo_cleanly(sig):
    proc = start(kvctl_cmd("demo", "--duration", "60", "--interval", "0.3", "--engines", "2"))
    try:
        assert proc.stdout is not None
        header = proc.stdout.readline()
        segment = SEGMENT_RE.search(header).group(1)
        assert proc.stdout.readline().startswith("(watch it from another terminal: kvctl --segment kvcached-demo-")
        assert proc.stdout.readline().startswith("[  ")  # the first status line: engines are running
        with Controller.open(segment) as c:
            pids = [e.pid for e in c.snapshot().engines]
        assert len(pids) == 2 and all(pid_alive(p) for p in pids)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "sharing a budget of 352 MiB" in out
    assert not shm_exists(segment)
    wait_for(lambda: not any(pid_alive(p) for p in pids), timeout_s=5, what="the engines to exit")


def test_streams_are_deterministic_and_peak_in_turn():
    w0, w1 = Workload(seed=1, phase_s=1.0), Workload(seed=2, phase_s=5.0)
    assert arrivals(w0, 200) == arrivals(w0, 200)
    assert arrivals(w0, 200) != arrivals(Workload(seed=3, phase_s=1.0), 200)
    assert rate_at(w0, 3.0) > 5 * rate_at(w0, 7.0)  # engine 0 peaks at 1-5 s
    assert rate_at(w1, 7.0) > 5 * rate_at(w1, 3.0)  # engine 1 at 5-9 s


def test_scheduler_conserves_blocks_and_waits_when_short():
    w = Workload(seed=4)
    stream = arrivals(w, 400)
    results = {}
    for cap in (None, 600, 80):
        blocks = StaticBlocks(cap)
        s = Scheduler(w, blocks, 16)
        for step in range(400):
            s.step(step, stream[step])
            assert blocks.num_used == s.stats().num_blocks_used
            assert cap is None or blocks.num_used <= cap
        results[cap] = s.stats()
        s.drain()
        assert blocks.num_used == 0
    unlimited, roomy, tight = results[None], results[600], results[80]
    assert unlimited.num_waited == unlimited.num_preempted == 0
    assert tight.num_waited > roomy.num_waited >= 0
    assert tight.num_preempted > 0
    assert unlimited.num_arrived == tight.num_arrived
    assert tight.num_finished <= unlimited.num_finished


def test_summary_replays_match_when_the_share_is_ample():
    from kvcached.demo.engine import EngineReport, EngineSpec
    from kvcached.demo.summary import summarize

    spec = EngineSpec(name="demo-1", shm_name="x", report_path="x", workload=Workload(seed=7), duration_s=10)
    report = EngineReport("demo-1", 200, 131072, 2 << 20, 16, 0, 0, 0, 0, 0, 0, 0, 0, 0.0)
    ample = summarize([spec], [report], 4 << 30).engines[0]
    assert ample.static_waited == ample.static_refused == 0
    assert ample.peak_need_bytes > 0
    tight = summarize([spec], [report], 16 << 20).engines[0]
    assert tight.static_waited > 0 and tight.peak_need_bytes == ample.peak_need_bytes


@pytest.mark.multiproc
def test_ctrl_c_at_a_terminal_ends_the_live_demo():
    """The live view in a real terminal whose Ctrl-C (the line discipline's SIGINT) hits the demo."""
    import fcntl
    import pty
    import select
    import struct
    import subprocess
    import termios
    import time

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 130, 0, 0))

    def controlling_terminal() -> None:
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    proc = subprocess.Popen(
        kvctl_cmd("demo", "--duration", "60", "--engines", "2"),
        stdin=slave,
        stdout=slave,
        stderr=slave,
        preexec_fn=controlling_terminal,
    )
    screen = b""

    def read_until(needle: bytes, timeout_s: float = 30.0) -> None:
        nonlocal screen
        deadline = time.monotonic() + timeout_s
        while needle not in screen:
            assert time.monotonic() < deadline, f"no {needle!r} in {screen[-600:]!r}"
            if select.select([master], [], [], 0.1)[0]:
                screen += os.read(master, 65536)

    try:
        read_until(b"q ends the demo")
        segment = SEGMENT_RE.search(screen.decode(errors="replace")).group(1)
        assert shm_exists(segment)
        os.write(master, b"\x03")
        read_until(b"sharing a budget of 352 MiB")
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
        os.close(slave)
    assert not shm_exists(segment)
    assert b"Traceback" not in screen
