"""``kvctl doctor``: is this machine and this install fit to run kvcached? Exit 1 if not."""

from __future__ import annotations

import enum
from typing import Annotated, NamedTuple

import typer

from kvctl import ctl

__all__ = ["Check", "Status", "doctor", "run_checks"]


class Status(str, enum.Enum):
    ok = "ok"
    info = "info"
    warn = "warn"
    fail = "FAIL"


class Check(NamedTuple):
    name: str
    status: Status
    detail: str


def _core() -> list[Check]:
    try:
        from kvcached import vmm
    except ImportError as exc:
        return [Check("compiled core", Status.fail, f"kvcached._vmm does not import: {exc} (reinstall kvcached)")]
    status = vmm.backend_status()
    checks = [Check("compiled core", Status.ok, f"kvcached._vmm built with backends: {', '.join(sorted(status))}")]
    host = status.get("host", "missing from this build")
    checks.append(Check("host backend", Status.ok if host == "ok" else Status.fail, "usable" if host == "ok" else host))
    cuda = status.get("cuda", "missing from this build")
    if cuda == "ok":
        checks.append(Check("cuda backend", Status.ok, "driver loaded, virtual memory management supported"))
    elif "libcuda" in cuda:
        checks.append(
            Check("cuda backend", Status.warn, f"{cuda}; GPU engines cannot use kvcached here, the host backend works")
        )
    else:
        checks.append(Check("cuda backend", Status.fail, cuda))
    return checks


def _packages() -> list[Check]:
    from kvcached.integrations.versions import check_installed, installed_version

    torch = installed_version("torch")
    checks = [
        Check("torch", Status.ok, torch)
        if torch
        else Check("torch", Status.info, "not installed (engines bring their own; `kvctl demo --tensors` needs it)")
    ]
    for found in check_installed():
        if not found.installed:
            checks.append(Check(found.engine, Status.info, f"not installed (supported: {found.supported})"))
        elif found.ok:
            checks.append(Check(found.engine, Status.ok, f"{found.version} (supported: {found.supported})"))
        else:
            checks.append(
                Check(
                    found.engine, Status.fail, f"{found.version} is not supported: kvcached supports {found.supported}"
                )
            )
    return checks


def _environment() -> list[Check]:
    from kvcached import envs

    bad = []
    for name in envs.REGISTRY:
        if envs.is_set(name):
            try:
                envs.get(name)
            except envs.EnvError as exc:
                bad.append(str(exc))
    if bad:
        return [Check("environment", Status.fail, "; ".join(bad))]
    return [Check("environment", Status.ok, "every KVCACHED_* variable that is set is valid")]


def _segment() -> list[Check]:
    from kvcached.control import ControlError, SegmentMissing
    from kvctl.listing import STALE_HEARTBEAT_S

    name = ctl.segment_name()
    try:
        controller = ctl.open_controller()
    except SegmentMissing:
        return [Check("segment", Status.info, f"no segment {name!r} yet (no engine has registered)")]
    except ControlError as exc:
        return [Check("segment", Status.fail, str(exc))]
    with controller:
        try:
            freed = controller.reclaim_dead()
            snap = controller.snapshot()
        except ControlError as exc:
            return [Check("segment", Status.fail, str(exc))]
    checks = [Check("segment", Status.ok, f"{name}: {len(snap.gpus)} GPU entr(y/ies), {len(snap.engines)} engine(s)")]
    if freed:
        checks.append(Check("dead engines", Status.info, f"reclaimed the slots of {', '.join(freed)}"))
    for e in snap.engines:
        if e.heartbeat_age_s > STALE_HEARTBEAT_S:
            checks.append(
                Check(
                    f"engine {e.name}", Status.warn, f"no heartbeat for {e.heartbeat_age_s:.1f} s (pid {e.pid} stuck?)"
                )
            )
        if e.watch_error:
            checks.append(Check(f"engine {e.name}", Status.warn, "its watcher hit an error applying a limit"))
    return checks


def run_checks() -> list[Check]:
    return [*_core(), *_packages(), *_environment(), *_segment()]


def doctor(
    json_out: Annotated[bool, typer.Option("--json", help="Print the checks as JSON.")] = False,
) -> None:
    """Check the compiled core, the VMM backends, torch/vLLM/SGLang versions, the environment and the segment."""
    checks = run_checks()
    failed = [c for c in checks if c.status is Status.fail]
    if json_out:
        ctl.print_json(
            {
                "ok": not failed,
                "checks": [{"name": c.name, "status": c.status.value.lower(), "detail": c.detail} for c in checks],
            }
        )
    else:
        width = max(len(c.name) for c in checks)
        for c in checks:
            typer.echo(f"[{c.status.value:>4}] {c.name.ljust(width)}  {c.detail}")
        typer.echo(f"{len(failed)} problem(s) found" if failed else "all good")
    if failed:
        raise typer.Exit(1)
