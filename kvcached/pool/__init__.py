"""The elastic KV pool: page-aware blocks over on-demand mapped page groups.

``KVPool`` is what an engine uses (blocks + its KV tensors); ``PagePool`` is the same
pool without tensors, over any :class:`PageMapper`; ``PageKeeper`` (its base) keeps
the reserve and the limit; ``BlockAllocator`` is the pure bookkeeping under them. Importing this package imports neither torch nor the compiled core.
"""

from kvcached.pool.allocator import BlockAllocator
from kvcached.pool.base import PageMapper, PoolError, PoolIntegrityError, PoolStats
from kvcached.pool.keeper import PageKeeper
from kvcached.pool.kvpool import KVPool, parse_device
from kvcached.pool.layout import KVLayout, PoolGeometry, ViewSpec, plan_geometry, view_specs
from kvcached.pool.pagepool import EvictCallback, PagePool
from kvcached.pool.reserve import ReserveConfig, ReservePlan, ReservePolicy

__all__ = [
    "BlockAllocator",
    "EvictCallback",
    "KVLayout",
    "KVPool",
    "PageKeeper",
    "PageMapper",
    "PagePool",
    "PoolError",
    "PoolGeometry",
    "PoolIntegrityError",
    "PoolStats",
    "ReserveConfig",
    "ReservePlan",
    "ReservePolicy",
    "ViewSpec",
    "parse_device",
    "plan_geometry",
    "view_specs",
]
