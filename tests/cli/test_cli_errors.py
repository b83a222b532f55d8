"""Every bad input gives one line on stderr naming what is wrong and what is allowed, and a
non-zero exit; never a traceback."""

from __future__ import annotations

import os
import signal

import pytest
from cli_helpers import read_status, standin_cmd, start, wait_for

from kvcached.control import Controller


def one_line_error(result, code=1, *needles):
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize(
    "args",
    [
        ("ls",),
        ("ls", "--json"),
        ("top", "--once"),
        ("limit", "a", "1G"),
        ("budget", "0", "1G"),
        ("set", "a", "--weight", "2"),
        ("rebalance",),
    ],
)
def test_no_segment_yet(kvctl, args):
    line = one_line_error(kvctl(*args), 1, "no control segment", "kvctl launch")
    assert line.startswith(f"kvctl {args[0]}: ")


@pytest.mark.parametrize(
    "args, needles",
    [
        (("limit", "a", "lots"), ("bad limit 'lots'", "allowed: a size like 512MiB")),
        (("limit", "a", "150%"), ("over 100%", "0-100")),
        (("limit", "a", "12Q"), ("unknown unit 'Q'",)),
        (("limit", "a", "--", "-1G"), ("cannot parse size",)),
        (("budget", "0", "101%"), ("bad budget", "over 100%")),
        (("set", "a", "--min", "none"), ("min cannot be 'none'",)),
        (("set", "a", "--min", "2X"), ("bad min",)),
        (("set", "a"), ("nothing to set", "--weight")),
        (("set", "a", "--weight", "0"), ("bad weight 0", "> 0")),
        (("set", "a", "--weight", "-3"), ("bad weight -3",)),
        (("launch", "--limit", "200%", "--", "true"), ("bad limit '200%'",)),
        (("launch", "--name", "-bad name", "--", "true"), ("bad engine name",)),
        (("launch",), ("Missing argument",)),
        (("demo", "--budget", "much"), ("bad budget 'much'",)),
        (("demo", "--budget", "1MiB"), ("too small", "64MiB")),
        (("top", "--once", "--sort", "colour"), ("allowed are",)),
    ],
)
def test_bad_values(kvctl, args, needles):
    result = kvctl(*args)
    code = 2 if "Missing argument" in needles else 1
    one_line_error(result, code, *needles)


@pytest.mark.parametrize(
    "args, needle",
    [
        (("limit",), "Missing argument 'NAME'"),
        (("limit", "a"), "Missing argument 'SIZE|PCT|none'"),
        (("top", "--interval", "x"), "--interval"),
        (("top", "--interval", "0"), "--interval"),
        (("rebalance", "--policy", "random"), "'random' is not one of"),
        (("ls", "--colour"), "No such option: --colour"),
        (("frobnicate",), "No such command 'frobnicate'"),
        (("demo", "--engines", "0"), "--engines"),
        (("demo", "--backend", "tpu"), "--backend"),
    ],
)
def test_usage_errors(kvctl, args, needle):
    line = one_line_error(kvctl(*args), 2, needle)
    assert "(usage: kvctl" in line


def test_unknown_engine_lists_the_live_ones(kvctl, engines):
    engines("alpha")
    engines("beta")
    for args in (("limit", "gamma", "1G"), ("set", "gamma", "--weight", "2")):
        one_line_error(kvctl(*args), 1, "no live engine named 'gamma'", "live engines: alpha, beta")


def test_unknown_gpu(kvctl, engines):
    engines("alpha")
    one_line_error(kvctl("budget", "7", "1G"), 1, "no single GPU entry matches '7'", "GPU entries: 0 (host-")
    one_line_error(kvctl("budget", "GPU-nope", "1G"), 1, "'GPU-nope'")


def test_cuda_demo_without_a_gpu(kvctl):
    from kvcached import vmm

    if vmm.backend_status()["cuda"] == "ok":
        pytest.skip("this machine has a usable GPU")
    one_line_error(kvctl("demo", "--backend", "cuda"), 1, "cuda backend is not usable here", "--backend host")


def test_bad_segment_name(kvctl, monkeypatch):
    monkeypatch.setenv("KVCACHED_SHM_NAME", "no/slashes")
    one_line_error(kvctl("ls"), 1, "bad segment name")


@pytest.mark.multiproc
def test_a_dead_engine(kvctl, engines, shm_name, tmp_path):
    """An engine killed without cleanup: ls drops it, limit/set name it unknown."""
    engines("alive")
    status = str(tmp_path / "status.json")
    proc = start(standin_cmd(status), env={**os.environ, "KVCACHED_ENGINE_NAME": "doomed"})
    try:
        wait_for(lambda: (read_status(status) or {}).get("ready"), what="the stand-in engine")
        with Controller.open(shm_name) as c:
            assert {e.name for e in c.snapshot().engines} == {"alive", "doomed"}
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    one_line_error(kvctl("limit", "doomed", "1G"), 1, "no live engine named 'doomed'", "live engines: alive")
    result = kvctl("ls", "--json")
    assert result.exit_code == 0
    assert "doomed" not in result.output
