"""Fixtures for the pool tests (helpers live in ``poolkit``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from poolkit import small_pool

from kvcached.pool import KVPool


@pytest.fixture
def make_pool() -> Iterator:
    """``make_pool(...)`` as :func:`small_pool`, closed after the test."""
    pools: list[KVPool] = []

    def make(*args: object, **kwargs: object) -> KVPool:
        pool = small_pool(*args, **kwargs)  # type: ignore[arg-type]
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pool.close()
