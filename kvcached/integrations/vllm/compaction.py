"""Moving running requests' blocks together, so the page groups they pin go back.

After a peak the last requests hold a few blocks on each of many page groups: each of
those groups stays mapped until its last block is freed, seconds later for long outputs.
Between two scheduler steps, :func:`before_step` moves the used blocks of the sparsest
groups into free slots of the densest ones (:func:`plan`), and the emptied groups go back
through the usual trim (their cached blocks are cold prefix cache, bounded as ever).

A move rides on what vLLM already has for copy-on-write: the block pairs go into the
step's ``SchedulerOutput.kv_cache_block_copies``, which the model runner copies (every
layer, on the compute stream) before the forward pass. Two things vLLM does not do are
ours:

* the scheduler side (:func:`before_step`, under the pool's lock, before the step is
  scheduled): the destination leaves vLLM's free queue and takes the source's place in
  the request's block list and its prefix-cache entries; the source stays held
  (``ref_cnt`` 1, USED) until the copy has run on the GPU;
* the worker side (:func:`rewrite_v1` / :func:`rewrite_v2`, before the runner applies
  the step): the request's row of the block table is rewritten, since vLLM's worker
  only ever appends to a running request's row. After the runner queued the copy,
  :func:`copy_queued` records a CUDA event on the same stream; once it has passed, the
  next step frees the sources.

Only where it is safe: one full-attention KV cache group, no KV connector, worker and
scheduler in one process (the worker says so by rewriting its first step), and only
blocks one request owns (``ref_cnt`` 1; a shared prefix pins its group). On by default
where kvcached packs (a GPU shared under a budget) and while a limit is unmet (used blocks
spread over more groups than the limit allows: moving them is how it gets met before the
requests end); ``KVCACHED_COMPACT`` overrides.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kvcached import envs
from kvcached.integrations.vllm import placement, runtime
from kvcached.integrations.vllm.states import CACHED, FREE, MAPPED, USED

if TYPE_CHECKING:
    from kvcached.integrations.vllm.pages import VllmPages

__all__ = ["Compactor", "Moves", "attach", "before_step", "compact", "copy_queued", "enabled", "plan", "rewrite_v1", "rewrite_v2"]

_log = logging.getLogger("kvcached.vllm")

# A round runs at most this often (it scans the page groups, and the running requests'
# block lists when it moves) and moves at most this many blocks (2 MiB each for an 8B
# model: a copy of well under a millisecond on an H200).
INTERVAL_S = 0.2
MAX_MOVES = 256
# Compact only when the used blocks sit on at least this many more groups than they fill.
MIN_GAIN = 2


@dataclass
class Moves:
    """One step's moves: what the worker must copy and rewrite, and what to free after."""

    pairs: list[tuple[int, int]]  # (source, destination) block ids
    rows: dict[str, list[int]]  # request id -> its whole block-id list after the moves
    sources: list[Any] = field(default_factory=list)  # the source KVCacheBlocks, held until copied
    queued: bool = False
    event: Any = None  # the CUDA event after the copy (None: copied synchronously)

    def copied(self, event: Any) -> None:
        """The worker queued the copy; ``event`` passes once it ran (None: it has)."""
        self.event = event
        self.queued = True

    def done(self) -> bool:
        return self.queued and (self.event is None or bool(self.event.query()))


def enabled(pages: VllmPages) -> bool:
    """``KVCACHED_COMPACT``: on, off, or auto (whenever the pool packs, or a limit is unmet)."""
    mode = envs.get("KVCACHED_COMPACT")
    return mode == "on" or (mode == "auto" and (not pages.limit_met or placement.packs(pages)))


def plan(pages: VllmPages, movable: Callable[[int], bool], max_moves: int = MAX_MOVES,
         min_gain: int = MIN_GAIN) -> list[tuple[int, int]]:
    """Which used blocks to move where: (source, destination) block ids.

    Sources are the used blocks of the sparsest mapped groups, each group whole (all its
    used blocks in ``movable``) or not at all, as long as the groups left keep room for
    them; destinations are free blocks on the densest groups left, then cached ones no
    prefix hit reused. Nothing when the used blocks sit on fewer than ``min_gain`` groups
    more than they fill. ``movable(block_id)``: whether a used block may move. Read under
    the pages' lock; changes nothing.
    """
    bpp, st, num_blocks = pages.blocks_per_page, pages.block_state, pages.num_blocks
    used = {p: pages.held[p] - pages.cached_on[p] for p in range(1, pages.num_pages)
            if pages.page_state[p] == MAPPED and pages.held[p] > pages.cached_on[p]}
    total = sum(used.values())
    if len(used) - -(-total // bpp) < min_gain:
        return []
    room = {p: _room(pages, p) for p in used}
    left = sum(room.values())
    sources: list[int] = []
    moving = 0
    for p in sorted(used, key=lambda p: (used[p], -p)):  # sparsest first; of equals, the highest
        if moving + used[p] > min(max_moves, left - room[p]):
            continue
        ids = range(p * bpp, min((p + 1) * bpp, num_blocks))
        if all(movable(b) for b in ids if st[b] == USED):
            sources.append(p)
            moving += used[p]
            left -= room[p]
    if not sources:
        return []
    taken = set(sources)
    moved = [b for p in sources for b in range(p * bpp, min((p + 1) * bpp, num_blocks)) if st[b] == USED]
    kept = sorted((p for p in used if p not in taken), key=lambda p: (-used[p], p))
    slots = (b for p in kept for b in _free_slots(pages, p))  # lazily: only as many as move
    return list(zip(moved, slots, strict=False))


def _room(pages: VllmPages, page: int) -> int:
    """How many blocks of ``page`` a move may take (``len(_free_slots(...))``, counted fast)."""
    if pages.cached_on[page]:
        return len(_free_slots(pages, page))
    start = page * pages.blocks_per_page
    return pages.block_state[start:start + pages.blocks_per_page].count(FREE)


def _free_slots(pages: VllmPages, page: int) -> list[int]:
    """Blocks on ``page`` a move may take: free ones, then cached ones no hit reused."""
    bpp, st, reused = pages.blocks_per_page, pages.block_state, pages.reused
    ids = range(page * bpp, min((page + 1) * bpp, pages.num_blocks))
    return [b for b in ids if st[b] == FREE] + [b for b in ids if st[b] == CACHED and not reused[b]]


class Compactor:
    """Per block pool (``ElasticBlockPool.compactor``): moves waiting for their copy, and
    when the last round ran."""

    def __init__(self) -> None:
        self.pending: list[Moves] = []
        self.last = 0.0
        self.moved = 0  # blocks moved so far


def before_step(scheduler: Any) -> Moves | None:
    """Under the pool's lock, before vLLM schedules a step: :func:`compact` its block pool,
    if this engine can move blocks at all (:func:`_safe`). The moves returned must reach
    this step's output (:func:`attach`)."""
    manager = getattr(scheduler, "kv_cache_manager", None)
    pool = getattr(manager, "block_pool", None)
    if pool is None or getattr(pool, "kv", None) is None:
        return None
    return compact(pool, pool.req_to_blocks or {}, lambda: _safe(scheduler, manager, pool))


def compact(pool: Any, req_to_blocks: Mapping[str, list[Any]], safe: Callable[[], bool] = lambda: True) -> Moves | None:
    """One round on an ``ElasticBlockPool`` whose running requests hold ``req_to_blocks``
    (under its lock): free the sources of earlier moves whose copy has run, then (at most
    every ``INTERVAL_S``, when ``safe()`` and :func:`enabled`) move blocks. The caller gets
    the moves to the worker, which calls :meth:`Moves.copied` once the copy is queued."""
    kv: VllmPages = pool.kv
    state: Compactor = pool.compactor
    if state.pending:
        finished = {id(m) for m in state.pending if m.done()}  # asked once: an event may pass meanwhile
        if finished:
            pool.free_blocks([b for m in state.pending if id(m) in finished for b in m.sources])
            state.pending = [m for m in state.pending if id(m) not in finished]
    now = time.monotonic()
    if now - state.last < INTERVAL_S or not safe() or not enabled(kv):
        return None
    state.last = now
    blocks = pool.blocks
    held = {b.block_id for m in state.pending for b in m.sources}  # earlier sources, until copied
    # Under an unmet limit one group freed is worth a move: it is what stands between the
    # engine and its limit (kvctl limit), and the freed sources wake the limit's unmap.
    pairs = plan(kv, lambda b: blocks[b].ref_cnt == 1 and b not in held, min_gain=1 if not kv.limit_met else MIN_GAIN)
    if not pairs:
        return None
    owners = _owners(req_to_blocks, {src for src, _ in pairs})
    if len(owners) < len(pairs):  # a block held by something other than one request: leave it all
        return None
    moves = _apply(pool, kv, req_to_blocks, owners, pairs)
    state.pending.append(moves)
    if not state.moved:
        _log.info("kvcached: compaction moved %d KV blocks off sparse page groups (KVCACHED_COMPACT=off disables it)",
                  len(pairs))
    state.moved += len(pairs)
    _log.debug("kvcached: compaction moved %d blocks (%d in all)", len(pairs), state.moved)
    return moves


def attach(output: Any, moves: Moves) -> None:
    """Add the moves to a step's ``SchedulerOutput``: the copies vLLM's runner makes, and
    the rows our worker patch rewrites."""
    from vllm.v1.core.kv_cache_utils import KVCacheBlockCopy

    copies = list(output.kv_cache_block_copies or ())
    copies.extend(KVCacheBlockCopy(src, dst) for src, dst in moves.pairs)
    output.kv_cache_block_copies = copies
    output.kvcached_moves = moves


def _safe(scheduler: Any, manager: Any, pool: Any) -> bool:
    """Whether this engine can move blocks: see the module's docstring."""
    kv = runtime.worker_kv()
    if kv is None or kv.pages is not pool.kv or not kv.rewrites_blocks:
        return False
    if getattr(scheduler, "connector", None) is not None or pool.req_to_blocks is None:
        return False
    managers: Sequence[Any] = getattr(getattr(manager, "coordinator", None), "single_type_managers", ())
    return (len(managers) == 1 and type(managers[0]).__name__ == "FullAttentionManager"
            and managers[0].req_to_blocks is pool.req_to_blocks)


def _owners(req_to_blocks: Mapping[str, Sequence[Any]], wanted: set[int]) -> dict[int, tuple[str, int]]:
    """Block id -> (request, position) for the ``wanted`` blocks a request holds."""
    owners: dict[int, tuple[str, int]] = {}
    for req_id, blocks in req_to_blocks.items():
        for pos, block in enumerate(blocks):
            if block.block_id in wanted:
                owners[block.block_id] = (req_id, pos)
    return owners


def _apply(pool: Any, kv: VllmPages, req_to_blocks: Mapping[str, list[Any]], owners: Mapping[int, tuple[str, int]],
           pairs: list[tuple[int, int]]) -> Moves:
    """Hand each destination to the source's request and prefix-cache entries; keep the
    source held (USED) until the copy ran."""
    blocks, queue, reused = pool.blocks, pool.free_block_queue, kv.reused
    move_hashes = getattr(pool, "move_block_hashes", None)
    collector = getattr(pool, "metrics_collector", None)
    rows: dict[str, list[Any]] = {}
    sources = []
    for src_id, dst_id in pairs:
        req_id, pos = owners[src_id]
        src, dst = blocks[src_id], blocks[dst_id]
        queue.remove(dst)
        pool._maybe_evict_cached_block(dst)  # a cached destination loses its entry
        dst.ref_cnt = 1
        if collector is not None:
            collector.on_block_allocated(dst)
        if src.block_hash is not None:
            if move_hashes is not None:
                move_hashes(src, dst)  # hits on this prefix now find the copy
            else:
                pool._maybe_evict_cached_block(src)
        reused[dst_id] = reused[src_id]
        row = req_to_blocks[req_id]
        row[pos] = dst
        rows[req_id] = row
        sources.append(src)
    kv.set_states((dst for _, dst in pairs), USED)
    return Moves(pairs=pairs, rows={r: [b.block_id for b in row] for r, row in rows.items()}, sources=sources)


# -- the worker side ------------------------------------------------------------------


def rewrite_v1(runner: Any, output: Any) -> Moves | None:
    """Before vLLM's V1 runner applies ``output``: the moved requests' block ids, in their
    cached state and their persistent-batch row."""
    moves: Moves | None = getattr(output, "kvcached_moves", None)
    _worker_ready()
    if moves is None:
        return None
    batch = runner.input_batch
    for req_id, ids in moves.rows.items():
        state = runner.requests.get(req_id)
        if state is None:
            continue
        state.block_ids[0][:] = ids
        index = batch.req_id_to_index.get(req_id)
        if index is not None:
            batch.block_table.add_row(state.block_ids, index)
    return moves


def rewrite_v2(runner: Any, output: Any) -> Moves | None:
    """The same for Model Runner V2: the request's staged block-table row, rewritten whole."""
    moves: Moves | None = getattr(output, "kvcached_moves", None)
    _worker_ready()
    if moves is None:
        return None
    index_of = runner.req_states.req_id_to_index
    for req_id, ids in moves.rows.items():
        index = index_of.get(req_id)
        if index is not None:
            runner.block_tables.append_block_ids(index, (ids,), overwrite=True)
    return moves


def copy_queued(moves: Moves | None) -> None:
    """After the runner applied the step (the copy is queued on the current stream)."""
    if moves is None:
        return
    import torch

    event = None
    if torch.cuda.is_available():
        event = torch.cuda.Event()
        event.record()
    moves.copied(event)


def _worker_ready() -> None:
    kv = runtime.worker_kv()
    if kv is not None and not kv.rewrites_blocks:
        kv.rewrites_blocks = True
