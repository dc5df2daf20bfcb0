"""Iteration-level scheduler: which requests run this step and how many tokens each."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from harvest.engine.block_manager import BlockManager
from harvest.engine.config import SchedulerConfig
from harvest.engine.request import Request, RequestStatus


@dataclass
class ScheduledBatch:
    requests: list[Request] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    def add(self, request: Request, num_tokens: int) -> None:
        self.requests.append(request)
        self.num_new_tokens.append(num_tokens)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __bool__(self) -> bool:
        return bool(self.requests)


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.blocks = block_manager
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        """Fill one step's token budget.

        Running requests go first, in arrival order, each taking what it still has to
        compute (one token when decoding, a chunk when prefilling). When the pool has no
        block for one of them, the latest-arrived running request is preempted (its blocks
        freed, its progress reset, back to the head of the queue). Then waiting requests
        are admitted in order while the budget, `max_num_seqs` and free blocks allow; a
        request that does not fit blocks those behind it, so arrival order is kept.
        """
        batch = ScheduledBatch()
        budget = self.config.max_num_batched_tokens
        running = sorted(self.running, key=lambda r: r.arrival_time)
        while running and budget:
            req = running.pop(0)
            n = min(req.num_uncomputed_tokens, budget)
            while not self.blocks.allocate(req, req.num_computed_tokens + n):
                victim = running.pop() if running else req
                self._preempt(victim, batch)
                if victim is req:
                    break
            else:
                batch.add(req, n)
                budget -= n
        while self.waiting and budget and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            n = min(req.num_uncomputed_tokens, budget)
            if not self.blocks.allocate(req, req.num_computed_tokens + n):
                break
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            batch.add(req, n)
            budget -= n
        return batch

    def _preempt(self, req: Request, batch: ScheduledBatch) -> None:
        self.running.remove(req)
        self.blocks.free(req)
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        req.status = RequestStatus.WAITING
        self.waiting.appendleft(req)
        batch.preempted.append(req)

    def finish(self, req: Request) -> None:
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.blocks.free(req)
