"""The public API kvctl uses: validation, one-line errors, nothing changed on error."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kvcached.control import (
    ControlError,
    Controller,
    EngineKind,
    InvalidValue,
    SegmentMissing,
    UnknownEngine,
    UnknownGpu,
    registry,
)

GiB = 1 << 30


@pytest.fixture
def ctl(controller: Controller) -> Controller:
    seg = controller.segment
    gpu0 = registry.find_or_create_gpu(seg, "GPU-aaaa-1", 80 * GiB, 0)
    gpu1 = registry.find_or_create_gpu(seg, "GPU-aaaa-2", 40 * GiB, 0)
    for name, gpu, demand in (("a", gpu0, 30 * GiB), ("b", gpu0, 10 * GiB), ("c", gpu1, 0)):
        index, _ = registry.claim_slot(seg, name, "m", EngineKind.OTHER, gpu, None, 1.0, 0)
        with registry.engine_write(seg.slots[index]):
            seg.slots[index].demand_bytes = demand
    return controller


def _state(ctl: Controller) -> bytes:
    return (
        bytes(ctl.segment.header)
        + b"".join(bytes(s) for s in ctl.segment.slots)
        + b"".join(bytes(g) for g in ctl.segment.gpus)
    )


def _refused(ctl: Controller, error: type[Exception], call: object, *args: object) -> str:
    before = _state(ctl)
    with pytest.raises(error) as info:
        call(*args)  # type: ignore[operator]
    assert _state(ctl) == before
    assert "\n" not in str(info.value)
    return str(info.value)


def test_set_limit_in_every_spelling(ctl: Controller) -> None:
    generation = ctl.snapshot().generation
    assert ctl.set_limit("a", 8 * GiB) == 2
    assert ctl.snapshot().engine("a").limit_bytes == 8 * GiB
    assert ctl.set_limit("a", "512MiB") == 3
    assert ctl.snapshot().engine("a").limit_bytes == 512 << 20
    ctl.set_limit("a", "25%")  # of GPU-aaaa-1's capacity (no budget, no headroom: its total)
    assert ctl.snapshot().engine("a").limit_bytes == 20 * GiB
    ctl.set_limit("a", "none")
    assert ctl.snapshot().engine("a").limit_bytes is None
    ctl.set_limit("a", 0)
    info = ctl.snapshot().engine("a")
    assert (info.limit_bytes, info.limit_revision, info.limit_pending) == (0, 6, True)
    assert ctl.snapshot().generation > generation


@pytest.mark.parametrize("limit", [-1, "abc", "-5G", "150%", "12 parsecs", True, 1.5, 1 << 63, [1]])
def test_bad_limits_change_nothing(ctl: Controller, limit: object) -> None:
    _refused(ctl, InvalidValue, ctl.set_limit, "a", limit)


def test_unknown_engine(ctl: Controller) -> None:
    assert "'zz'" in _refused(ctl, UnknownEngine, ctl.set_limit, "zz", GiB)
    _refused(ctl, UnknownEngine, ctl.set_weight, "zz", 2)
    _refused(ctl, UnknownEngine, ctl.set_min, "zz", GiB)
    _refused(ctl, UnknownEngine, ctl.wait_applied, "zz", 1, 0.01)


@pytest.mark.parametrize("weight", [0, -1, float("nan"), float("inf"), "3", None, True])
def test_bad_weights(ctl: Controller, weight: object) -> None:
    _refused(ctl, InvalidValue, ctl.set_weight, "a", weight)


def test_weight_and_min(ctl: Controller) -> None:
    ctl.set_weight("b", 2.5)
    ctl.set_min("b", "1GiB")
    info = ctl.snapshot().engine("b")
    assert (info.weight, info.min_bytes, info.limit_revision) == (2.5, GiB, 1)  # not a limit change
    _refused(ctl, InvalidValue, ctl.set_min, "b", None)
    _refused(ctl, InvalidValue, ctl.set_min, "b", -1)


def test_budget_by_uuid_prefix_and_index(ctl: Controller) -> None:
    ctl.set_budget("GPU-aaaa-1", 60 * GiB)
    ctl.set_budget(1, "50%")
    gpus = {g.uuid: g for g in ctl.snapshot().gpus}
    assert gpus["GPU-aaaa-1"].budget_bytes == 60 * GiB and gpus["GPU-aaaa-2"].budget_bytes == 20 * GiB
    assert gpus["GPU-aaaa-2"].capacity_bytes == 20 * GiB
    ctl.set_budget("GPU-aaaa-1", None)
    assert ctl.snapshot().gpu(0).budget_bytes is None
    _refused(ctl, UnknownGpu, ctl.set_budget, "GPU-aaaa", GiB)  # ambiguous prefix
    _refused(ctl, UnknownGpu, ctl.set_budget, 7, GiB)
    _refused(ctl, InvalidValue, ctl.set_budget, 0, "-1G")


def test_rebalance_dry_run_then_apply(ctl: Controller) -> None:
    before = _state(ctl)
    changes = ctl.rebalance("demand", dry_run=True)
    assert _state(ctl) == before
    assert {(c.name, c.old_limit_bytes, c.new_limit_bytes) for c in changes} == {
        ("a", None, 30 * GiB + 20 * GiB),
        ("b", None, 10 * GiB + 20 * GiB),
        ("c", None, 40 * GiB),
    }
    assert ctl.rebalance("demand") == changes
    snap = ctl.snapshot()
    assert {e.name: e.limit_bytes for e in snap.engines} == {c.name: c.new_limit_bytes for c in changes}
    assert all(e.limit_revision == 2 for e in snap.engines)
    assert ctl.rebalance("demand") == []  # nothing left to change
    _refused(ctl, InvalidValue, ctl.rebalance, "fair-ish")


def test_missing_segment(shm_name: str) -> None:
    with pytest.raises(SegmentMissing):
        Controller.open(shm_name)


def test_errors_share_one_base() -> None:
    assert issubclass(InvalidValue, ControlError) and issubclass(InvalidValue, ValueError)


def test_import_is_light() -> None:
    code = (
        "import sys, time; t = time.perf_counter(); import kvcached.control; "
        "dt = time.perf_counter() - t; "
        "heavy = [m for m in ('torch', 'numpy', 'kvcached._vmm', 'kvcached.pool', 'psutil', 'typer', 'rich') if m in sys.modules]; "
        "print(heavy, dt)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split(
        maxsplit=1
    )
    assert out[0] == "[]", out
