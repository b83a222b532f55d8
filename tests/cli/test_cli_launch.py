"""kvctl launch runs a real engine stand-in: environment, signals, exit code, slot cleanup."""

from __future__ import annotations

import signal

import pytest
from cli_helpers import MiB, kvctl_cmd, pid_alive, read_status, standin_cmd, start, wait_for

from kvcached.control import Controller

pytestmark = pytest.mark.multiproc


def engines_in(shm_name):
    try:
        with Controller.open(shm_name) as c:
            return {e.name: e for e in c.snapshot().engines}
    except Exception:
        return {}


def launch(status, *launch_args, standin_args=()):
    return start(kvctl_cmd("launch", *launch_args, "--", *standin_cmd(status, *standin_args)))


def test_registers_with_name_limit_and_env_then_passes_exit_code(shm_name, tmp_path):
    status = str(tmp_path / "s.json")
    proc = launch(
        status,
        "--name",
        "llama",
        "--limit",
        "32MiB",
        "--gpu",
        "3",
        standin_args=("--exit-after", "0.5", "--exit-code", "7"),
    )
    try:
        info = wait_for(lambda: (read_status(status) or {}).get("ready") and read_status(status), what="the engine")
        env = info["env"]
        assert env["ENABLE_KVCACHED"] == "true" and env["KVCACHED_AUTOPATCH"] == "1"
        assert env["KVCACHED_ENGINE_NAME"] == "llama" and env["KVCACHED_LIMIT"] == "32MiB"
        assert env["KVCACHED_SHM_NAME"] == shm_name and env["CUDA_VISIBLE_DEVICES"] == "3"
        assert info["pgid"] == info["pid"]  # its own process group
        engine = engines_in(shm_name)["llama"]
        assert engine.limit_bytes == 32 * MiB and engine.pid == info["pid"]
        _out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 7, err
    assert "llama" not in engines_in(shm_name)


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 3), (signal.SIGINT, 0)])
def test_forwards_signals_once(shm_name, tmp_path, sig, code):
    status = str(tmp_path / "s.json")
    proc = launch(status, "--name", "sig", standin_args=("--exit-code", str(code)))
    try:
        wait_for(lambda: (read_status(status) or {}).get("ready"), what="the engine")
        proc.send_signal(sig)
        _out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, err
    assert read_status(status)["signals"] == [sig.name]
    assert "sig" not in engines_in(shm_name)


def test_engine_killed_hard_its_slot_is_reclaimed(shm_name, tmp_path):
    status = str(tmp_path / "s.json")
    proc = launch(status, "--name", "crashy", standin_args=("--crash",))
    _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGKILL
    assert "reclaimed the slot(s) of 'crashy'" in err
    with Controller.open(shm_name) as c:
        snap = c.snapshot()
    assert snap.engines == [] and snap.gpus[0].mapped_bytes == 0


def test_leftover_processes_are_stopped(shm_name, tmp_path):
    status = str(tmp_path / "s.json")
    proc = launch(status, "--grace", "2", standin_args=("--leave-child", "--exit-after", "0.2"))
    _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    child = read_status(status)["child"]
    assert "left 1 process(es) behind" in err
    wait_for(lambda: not pid_alive(child), timeout_s=5, what="the leftover child to go")


def test_duplicate_name_is_refused_before_starting(kvctl, engines, tmp_path):
    engines("taken")
    status = str(tmp_path / "s.json")
    result = kvctl("launch", "--name", "taken", "--", *standin_cmd(status))
    assert result.exit_code == 1
    assert "an engine named 'taken' is already running" in result.stderr
    assert read_status(status) is None


def test_command_not_found(kvctl):
    result = kvctl("launch", "--", "no-such-engine-binary", "serve")
    assert result.exit_code == 127
    assert (
        result.stderr.strip()
        == "kvctl launch: command not found: 'no-such-engine-binary' (give the engine command after --)"
    )


def test_exit_code_of_a_plain_command(kvctl):
    assert kvctl("launch", "--", "sh", "-c", "exit 5").exit_code == 5
    assert kvctl("launch", "--", "true").exit_code == 0
