"""A pytest plugin that runs vLLM's own tests with kvcached active.

    pytest -p kvcached.integrations.vllm.testing tests/v1/core/...

It arms the patches as the import hook would (``ENABLE_KVCACHED=true``) and, because
those tests build ``BlockPool`` directly, also replaces ``vllm.v1.core.block_pool.BlockPool``
with :class:`~kvcached.integrations.vllm.block_pool.ElasticBlockPool`. With no worker in
the process, each pool maps its pages in a small arena of its own on the host backend.

Arming happens when pytest imports this plugin (``-p`` plugins load before any
``conftest.py``, which may import vLLM).
"""

from __future__ import annotations

import os
from typing import Any

from kvcached.integrations import autopatch
from kvcached.integrations.hooks import when_imported
from kvcached.integrations.vllm import patch_block_pool_module

os.environ["ENABLE_KVCACHED"] = "true"
os.environ.setdefault("KVCACHED_AUTOPATCH", "1")
autopatch.install()
when_imported("vllm.v1.core.block_pool", patch_block_pool_module)


def pytest_report_header(config: Any) -> str:
    return "kvcached: ElasticBlockPool active (pages on host-backend stand-in arenas)"
