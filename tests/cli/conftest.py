"""Fixtures for the kvctl tests: a segment of their own, real engines in it, a CLI runner.

Every test gets a fresh segment name (``kvcached-test-<uuid>``) through
``KVCACHED_SHM_NAME``, so kvctl invoked in-process or as a subprocess talks to it and
nothing else; the segment is unlinked afterwards.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from typer.testing import CliRunner

from kvcached.control import Controller, EngineHandle, attach_engine

sys.path.insert(0, os.path.dirname(__file__))

from cli_helpers import Engine


@pytest.fixture
def shm_name(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    name = f"kvcached-test-{uuid.uuid4().hex[:16]}"
    monkeypatch.setenv("KVCACHED_SHM_NAME", name)
    yield name
    Controller.unlink(name)


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def kvctl(runner: CliRunner, shm_name: str) -> Callable[..., Any]:
    """Run kvctl in-process against the test's segment: ``kvctl("ls", "--json")``."""
    from kvctl.main import app

    def invoke(*args: str) -> Any:
        return runner.invoke(app, list(args))

    return invoke


@pytest.fixture
def engines(shm_name: str) -> Iterator[Callable[..., Engine]]:
    """Start engines in this process: ``engines("a", alloc=8)`` → an :class:`Engine`."""
    from kvcached.demo.pool import ModelShape, build_pool

    made: list[tuple[Any, EngineHandle]] = []

    def start(name: str, alloc: int = 0, limit_bytes: int | None = None, cap_bytes: int = 256 << 20) -> Engine:
        dp = build_pool(ModelShape(), "host", 256 << 20, cap_bytes)
        handle = attach_engine(
            dp.pool,
            name,
            "test/model",
            "other",
            shm_name,
            arena=dp.arena,
            backend=dp.backend,
            limit_bytes=limit_bytes,
            headroom_bytes=0,
        )
        made.append((dp, handle))
        engine = Engine(name, dp, handle)
        if alloc:
            engine.alloc(alloc)
        return engine

    yield start
    for dp, handle in reversed(made):
        handle.close()
        dp.close()
