"""Fixtures for the control-plane tests: every test gets its own segment name."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from kvcached.control import Controller
from kvcached.control.segment import Segment


@pytest.fixture
def shm_name() -> Iterator[str]:
    """A segment name no other test or demo uses; unlinked afterwards."""
    name = f"kvcached-test-{uuid.uuid4().hex[:16]}"
    yield name
    Segment.unlink(name)


@pytest.fixture
def controller(shm_name: str) -> Iterator[Controller]:
    ctl = Controller.open(shm_name, create=True)
    yield ctl
    ctl.close()
