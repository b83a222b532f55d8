"""The elastic KV memory behind one SGLang KV pool: a :class:`~kvcached.pool.KVPool` sized
in SGLang's token slots, the capacity SGLang may count on, release/resume, registration.

SGLang addresses KV memory by token slot; its allocators hand out *SGLang pages* of
``page_size`` slots (``page_size`` 1: single slots). One SGLang page is one kvcached
block, so block ``b`` holds slots ``[b * page_size, (b + 1) * page_size)``, block 0 (slot
0's page, where SGLang writes padded tokens) is the pool's pinned block, and the pool
maps whole page groups under them on demand.

A released engine (``release_memory_occupation`` of ``kv_cache``) holds no KV memory at
all: the pinned page group is unmapped too, straight through the arena (the pool keeps
counting it as mapped, so ``check_integrity`` and ``stats().mapped_bytes`` disagree with
the arena until :meth:`ElasticKV.resume` maps it again; the control plane reads the
arena's ledger and shows 0).

No SGLang import here: the version modules wrap SGLang's classes around this.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any, NamedTuple

from kvcached import envs
from kvcached.pool import KVLayout, KVPool, plan_geometry

if TYPE_CHECKING:
    import torch

__all__ = ["ElasticKV", "KVShape", "elastic_store_of", "live_stores", "resolve_engine_name"]

_log = logging.getLogger("kvcached.sglang")
_MEM_INFO_TTL_S = 0.05  # mem_info() is a driver call: ask at most this often

_stores: weakref.WeakSet[ElasticKV] = weakref.WeakSet()
_stores_lock = threading.Lock()


class KVShape(NamedTuple):
    """One SGLang KV pool's shape: ``num_slots`` token slots (``size + page_size``)."""

    layout: KVLayout
    num_layers: int
    page_size: int
    num_heads: int
    head_dim: int
    num_slots: int


def elastic_store_of(kvcache: Any) -> ElasticKV | None:
    """The :class:`ElasticKV` behind an SGLang KV pool, or None for a plain one."""
    return getattr(kvcache, "kvcached_store", None)


def live_stores() -> list[ElasticKV]:
    """Every open store in this process (release/resume acts on all of them)."""
    with _stores_lock:
        return [store for store in _stores if not store.closed]


def resolve_engine_name() -> str | None:
    """``KVCACHED_ENGINE_NAME``, else the ``--served-model-name`` or ``--model-path`` of
    this process's command line made a valid name (a path "/models/llama" registers as
    "models/llama"); None when neither is known (no registration)."""
    name = str(envs.get("KVCACHED_ENGINE_NAME"))
    if name:
        return name
    from kvcached.control import registry

    argv = sys.argv
    for flag in ("--served-model-name", "--model-path", "--model"):
        for i, arg in enumerate(argv):
            if arg == flag and i + 1 < len(argv):
                return registry.name_from_model(argv[i + 1], "sglang")
            if arg.startswith(flag + "="):
                return registry.name_from_model(arg.split("=", 1)[1], "sglang")
    return None


def _backend_for(device: object) -> Any:
    """The VMM backend for SGLang's ``device`` string (``cpu`` → host, ``cuda[:N]`` → that GPU)."""
    from kvcached import vmm

    text = str(device).lower()
    if text.startswith("cuda"):
        import torch

        index = int(text.partition(":")[2] or torch.cuda.current_device())
        return vmm.make_backend("cuda", index)
    if text == "cpu":
        return vmm.make_backend("host")
    raise ValueError(f"kvcached: SGLang KV device {device!r} is not supported (cpu or cuda)")


class ElasticKV:
    """One SGLang KV pool's memory. Thread-safe as :class:`KVPool`.

    Args:
        shape: the SGLang pool's shape.
        dtype: the stored dtype (SGLang's ``store_dtype``).
        device: SGLang's device string.
        register: attach to the control plane now (name from :func:`resolve_engine_name`);
            else :meth:`register` does it later (the SGLang allocators do, when they bind).

    Raises:
        ValueError: an unsupported device or shape; MemoryError: the pinned page group.
    """

    def __init__(self, shape: KVShape, dtype: torch.dtype, device: object, *, register: bool = True) -> None:
        backend = _backend_for(device)
        probe = plan_geometry(
            shape.layout,
            shape.num_layers,
            shape.page_size,
            shape.num_heads,
            shape.head_dim,
            dtype.itemsize,
            granularity=backend.granularity,
            virtual_bytes=1 << 62,
            min_page_bytes=envs.get("KVCACHED_PAGE_SIZE"),
        )
        num_blocks = -(-shape.num_slots // shape.page_size)
        num_groups = -(-num_blocks // probe.blocks_per_page)
        self.shape = shape
        self.pool = KVPool(
            shape.num_layers,
            shape.layout,
            shape.page_size,
            shape.num_heads,
            shape.head_dim,
            dtype,
            backend=backend,
            virtual_bytes=num_groups * probe.group_bytes,
            page_bytes=probe.page_bytes,
        )
        # Blocks past SGLang's last page exist only because page groups round up.
        self.max_block_id = num_blocks - 1
        self.closed = False
        # The rows SGLang's kernels read at slot 0's page, zeroed whenever its group is (re)mapped.
        self.pinned_views: list[torch.Tensor] = []
        self._released_limit: tuple[int | None] | None = None
        self._pinned_pages = [0]  # the page group of block 0, the pool's one pinned block
        self._pinned_unmapped = False
        self._mem_free_bytes = 0
        self._mem_free_t = -1.0
        self._registered = False
        self._handle: Any = None
        if register:
            self.register()
        with _stores_lock:
            _stores.add(self)

    # -- capacity -------------------------------------------------------------------

    def allocatable_blocks(self) -> int:
        """Blocks an ``alloc()`` could get now: free mapped blocks plus page groups that
        can still be mapped under the limit and the device's free memory."""
        stats = self.pool.stats()
        if not stats.limit_met:
            return 0
        limit_groups = stats.virtual_bytes // stats.group_bytes
        if stats.limit_bytes is not None:
            limit_groups = min(limit_groups, stats.limit_bytes // stats.group_bytes)
        room = max(0, limit_groups - stats.num_pages_mapped)
        if room:
            room = min(room, self._device_free_bytes() // stats.group_bytes)
        return stats.num_blocks_free + room * self.pool.blocks_per_page

    def _device_free_bytes(self) -> int:
        now = time.monotonic()
        if now - self._mem_free_t > _MEM_INFO_TTL_S:
            free_bytes = int(self.pool.backend.mem_info()[0])
            if self.pool.backend.name == "cuda":
                free_bytes -= int(envs.get("KVCACHED_HEADROOM"))
            self._mem_free_bytes = max(0, free_bytes)
            self._mem_free_t = now
        return self._mem_free_bytes

    # -- release / resume -----------------------------------------------------------

    def release(self) -> int:
        """Give back all KV memory, the pinned page group's too (SGLang has flushed its
        cache and synchronized the device first: no slot is held, no kernel runs). Until
        :meth:`resume` nothing is mapped and ``alloc()`` grants nothing. If blocks are
        still in use the pinned group stays (their pages stay mapped too). Idempotent.

        Returns:
            The bytes still mapped (0 unless blocks are in use).
        """
        if self._released_limit is None:
            self._released_limit = (self.pool.limit_bytes,)
            # Under one page group: never met, so nothing is granted or mapped any more.
            self.pool.set_limit_bytes(0)
        self.pool.trim_reserve()
        if not self._pinned_unmapped and self.pool.stats().num_blocks_used == 0:
            self.pool.arena.unmap(self._pinned_pages)
            self._pinned_unmapped = True
        if self._handle is not None:
            self._handle.set_sleeping(True)
        return int(self.pool.arena.mapped_bytes)

    def resume(self) -> None:
        """Undo :meth:`release`: map the pinned page group again (zeroing SGLang's
        padded rows) and restore the limit from before, unless another one was set
        meanwhile. Idempotent.

        Raises:
            MemoryError: the device has no room for the pinned page group (still released).
        """
        if self._pinned_unmapped:
            self.pool.arena.map(self._pinned_pages)
            self._pinned_unmapped = False
            self.zero_pinned()
        if self._released_limit is not None:
            (limit,) = self._released_limit
            self._released_limit = None
            if self.pool.limit_bytes == 0:  # else a limit set while released (kvctl) stands
                self.pool.set_limit_bytes(limit)
        if self._handle is not None:
            self._handle.set_sleeping(False)

    def zero_pinned(self) -> None:
        """Zero :attr:`pinned_views` (fresh device memory holds garbage; kernels read these rows)."""
        for view in self.pinned_views:
            view.zero_()

    @property
    def released(self) -> bool:
        return self._released_limit is not None

    # -- life cycle -----------------------------------------------------------------

    def register(self) -> None:
        """Attach to the control plane under :func:`resolve_engine_name`, once; nothing when
        no name is known. Raises what ``attach_engine`` raises (e.g. the name is taken)."""
        if self._registered or self.closed:
            return
        self._registered = True
        name = resolve_engine_name()
        if name is None:
            _log.info("kvcached: no engine name (KVCACHED_ENGINE_NAME, --served-model-name); not registered")
            return
        from kvcached.control import attach_engine

        self._handle = attach_engine(self.pool, name, name, "sglang")

    def shares_budget(self) -> bool:
        """Whether this engine's GPU has a kvcached budget (engines share it)."""
        handle = self._handle
        return handle is not None and handle.budget_room_bytes() is not None

    def close(self) -> None:
        """Leave the control plane and release the memory and address range. Idempotent."""
        if self.closed:
            return
        self.closed = True
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        self.pool.close()
