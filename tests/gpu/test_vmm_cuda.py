"""The CUDA backend on a real GPU. Each scenario runs in a spawned process."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from kvcached import _vmm

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(_vmm.backend_status()["cuda"] != "ok", reason="no usable CUDA GPU here"),
]

HERE = os.path.dirname(__file__)


def run_scenario(name: str) -> str:
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "vmm_scenarios.py"), name],
        capture_output=True,
        text=True,
        timeout=300,
    )
    print(proc.stdout, proc.stderr[-4000:])
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def test_device_memory_drops_by_the_mapped_bytes_and_comes_back():
    run_scenario("memory_drops_and_returns")


def test_live_pages_keep_data_and_pointers_across_remaps():
    run_scenario("data_survives_remaps_with_stable_pointers")


def test_out_of_memory_at_the_real_device_limit_is_the_specific_exception():
    assert "OutOfMemoryError" in run_scenario("oom_at_the_device_limit_is_specific")


def test_auto_handle_mode_uses_per_range_handles_and_group_is_refused():
    assert "refused as expected" in run_scenario("handle_modes_on_cuda")
