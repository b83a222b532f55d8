"""Run every test from a scratch directory.

Tests start real subprocesses (`python -c ...`, `python -m ...`), which put their working
directory first on sys.path; from the repository root that would import the kvcached source
tree (which has no compiled core) instead of the installed package.
"""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True, scope="session")
def _run_outside_the_source_tree(tmp_path_factory: pytest.TempPathFactory):
    before = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    yield
    os.chdir(before)
