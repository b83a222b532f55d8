"""A continuous-batching scheduler, reduced to what moves KV memory.

Each step, every running request decodes ``tokens_per_step`` tokens and takes a new block
whenever its tokens cross a block boundary; a finished request frees its blocks; then
waiting requests are started, oldest first, while their prompt's blocks can be had. When
a running request cannot get a block, the most recently started request is preempted
(its blocks freed, the request put back at the head of the queue to be recomputed), as
vLLM does. A request still waiting ``max_wait_s`` after it arrived is refused.

The scheduler takes its blocks from a :class:`BlockSource`: the engine's real pool in the
demo, a fixed number of blocks (:class:`StaticBlocks`) in the summary's replays.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from kvcached.demo.workload import Arrival, Workload

__all__ = ["BlockSource", "Scheduler", "SchedulerStats", "StaticBlocks"]


class BlockSource(Protocol):
    """Where blocks come from. ``alloc`` returns None when it cannot give ``n`` now."""

    def alloc(self, n: int) -> list[int] | None: ...

    def free(self, block_ids: Sequence[int]) -> None: ...


class StaticBlocks:
    """``num_blocks`` blocks and no more (None: as many as asked for)."""

    def __init__(self, num_blocks: int | None) -> None:
        self.num_blocks = num_blocks
        self.num_used = 0
        self._next_id = 0
        self._free_ids: list[int] = []

    def alloc(self, n: int) -> list[int] | None:
        if self.num_blocks is not None and self.num_used + n > self.num_blocks:
            return None
        take = min(n, len(self._free_ids))
        ids = self._free_ids[len(self._free_ids) - take :]
        del self._free_ids[len(self._free_ids) - take :]
        ids.extend(range(self._next_id, self._next_id + n - take))
        self._next_id += n - take
        self.num_used += n
        return ids

    def free(self, block_ids: Sequence[int]) -> None:
        self.num_used -= len(block_ids)
        self._free_ids.extend(block_ids)


class SchedulerStats(NamedTuple):
    """What happened to the requests so far."""

    num_arrived: int
    num_started: int  # started at least once
    num_finished: int
    num_waited: int  # not started in the step they arrived, or preempted
    num_refused: int  # gave up waiting (max_wait_s)
    num_preempted: int  # preemptions (a request may be preempted more than once)
    num_waiting: int  # in the queue now
    num_running: int
    num_blocks_used: int
    peak_blocks_used: int
    max_queue_steps: int  # longest a started request waited for its first start


@dataclass(eq=False)
class _Request:
    arrival: Arrival
    num_generated: int = 0
    blocks: list[int] = field(default_factory=list)
    started: bool = False

    @property
    def num_tokens(self) -> int:
        return self.arrival.prompt_tokens + self.num_generated


class Scheduler:
    """Runs one request stream over one block source. Not thread-safe."""

    def __init__(self, workload: Workload, source: BlockSource, block_size: int) -> None:
        self.workload = workload
        self.source = source
        self.block_size = block_size
        self.waiting: deque[_Request] = deque()
        self.running: list[_Request] = []  # in the order they started
        self._waited: set[int] = set()
        self._num_arrived = self._num_started = self._num_finished = 0
        self._num_refused = self._num_preempted = 0
        self._num_blocks_used = self._peak_blocks_used = self._max_queue_steps = 0

    def _blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _alloc(self, n: int) -> list[int] | None:
        ids = self.source.alloc(n)
        if ids is not None:
            self._num_blocks_used += n
            self._peak_blocks_used = max(self._peak_blocks_used, self._num_blocks_used)
        return ids

    def _release(self, request: _Request) -> None:
        if request.blocks:
            self.source.free(request.blocks)
            self._num_blocks_used -= len(request.blocks)
            request.blocks = []

    def _preempt_last(self) -> _Request:
        victim = self.running.pop()
        self._release(victim)
        self.waiting.appendleft(victim)
        self._waited.add(victim.arrival.request_id)
        self._num_preempted += 1
        return victim

    def step(self, step: int, new: Sequence[Arrival]) -> None:
        """Run step ``step`` with the requests that arrived in it."""
        for arrival in new:
            self.waiting.append(_Request(arrival))
        self._num_arrived += len(new)
        self._decode()
        self._admit(step)

    def _decode(self) -> None:
        tokens_per_step = self.workload.tokens_per_step
        i = 0
        while i < len(self.running):
            request = self.running[i]
            num_new = min(tokens_per_step, request.arrival.output_tokens - request.num_generated)
            need = self._blocks_for(request.num_tokens + num_new) - len(request.blocks)
            while need > 0:
                ids = self._alloc(need)
                if ids is not None:
                    request.blocks.extend(ids)
                    break
                if self._preempt_last() is request:
                    break
            if i >= len(self.running) or self.running[i] is not request:
                continue  # it was preempted itself (it was the last to start)
            request.num_generated += num_new
            if request.num_generated >= request.arrival.output_tokens:
                self._release(request)
                self.running.pop(i)
                self._num_finished += 1
                continue
            i += 1

    def _admit(self, step: int) -> None:
        max_wait_steps = self.workload.max_wait_steps
        while self.waiting:
            request = self.waiting[0]
            queued = step - request.arrival.step
            if not request.started and queued > max_wait_steps:
                self.waiting.popleft()
                self._num_refused += 1
                continue
            ids = self._alloc(self._blocks_for(request.num_tokens))
            if ids is None:
                break
            self.waiting.popleft()
            request.blocks = ids
            if not request.started:
                request.started = True
                self._num_started += 1
                self._max_queue_steps = max(self._max_queue_steps, queued)
            self.running.append(request)
        for request in self.waiting:
            self._waited.add(request.arrival.request_id)

    def drain(self) -> None:
        """Give every block back (the engine stops)."""
        for request in self.running:
            self._release(request)
        self.running.clear()

    def stats(self) -> SchedulerStats:
        return SchedulerStats(
            num_arrived=self._num_arrived,
            num_started=self._num_started,
            num_finished=self._num_finished,
            num_waited=len(self._waited),
            num_refused=self._num_refused,
            num_preempted=self._num_preempted,
            num_waiting=len(self.waiting),
            num_running=len(self.running),
            num_blocks_used=self._num_blocks_used,
            peak_blocks_used=self._peak_blocks_used,
            max_queue_steps=self._max_queue_steps,
        )
