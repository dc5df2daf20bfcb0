"""Iteration-level scheduler with two request classes: which requests run this step, and how much."""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from harvest.engine.block_manager import BlockManager
from harvest.engine.config import Policy, SchedulerConfig
from harvest.engine.latency_model import BatchShape, LatencyModel
from harvest.engine.request import Request, RequestStatus


@dataclass
class ScheduledBatch:
    requests: list[Request] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    # admitted to load a checkpoint into their blocks from the first one after their cached
    # prefix (the engine starts the loads; they join a batch once their blocks are in)
    loads: list[tuple[Request, int]] = field(default_factory=list)
    shape: BatchShape = field(default_factory=BatchShape)
    latency_budget_s: float | None = None  # offline work's (harvest)
    online_prefill_budget_s: float | None = None  # an online prefill chunk's (harvest)
    offline_token_budget: int = 0
    recomputed_tokens: int = 0  # of num_tokens, those their request had computed before a preemption
    prefix_queried_tokens: int = 0  # tokens of the requests admitted this step
    prefix_hit_tokens: int = 0  # of those, found in the prefix cache (not computed)

    def add(self, request: Request, num_tokens: int) -> None:
        self.requests.append(request)
        self.num_new_tokens.append(num_tokens)
        start = request.num_computed_tokens
        self.recomputed_tokens += max(0, min(start + num_tokens, request.max_computed_tokens) - start)
        self.shape.add(num_tokens, request.num_computed_tokens)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    @property
    def offline_only(self) -> bool:
        return not any(r.is_online for r in self.requests)

    def __bool__(self) -> bool:
        return bool(self.requests)


def _no_loads(req: Request) -> None:
    pass


class Scheduler:
    """`cancel_load(req)` stops the checkpoint load of a LOADING request: when it returns, no
    copy into the request's blocks is under way or to come, so they may be freed."""

    def __init__(
        self,
        config: SchedulerConfig,
        blocks: BlockManager,
        latency: LatencyModel,
        cancel_load: Callable[[Request], None] = _no_loads,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.blocks = blocks
        self.latency = latency
        self.cancel_load = cancel_load
        self.now = now
        self.online_waiting: deque[Request] = deque()
        self.waiting: deque[Request] = deque()  # offline, or everything under fcfs
        # of `waiting`, counted as they enter and leave: a step must not scan a backlog of
        # thousands to find its best priority or count its classes
        self._waiting_priorities: Counter[int] = Counter()
        self._waiting_online = 0
        self.running: list[Request] = []  # everything holding blocks: RUNNING, or LOADING a checkpoint
        # how far recent steps with online work that overran the TPOT target overran it (observe)
        self._overruns: deque[float] = deque(maxlen=64)
        self._since_reserve = 0
        self.reserve_s = 0.0

    def add(self, request: Request) -> None:
        self._enqueue(request)

    def _enqueue(self, req: Request, front: bool = False) -> None:
        queue = self.online_waiting if req.is_online and self.config.has_classes else self.waiting
        if front:
            queue.appendleft(req)
        else:
            queue.append(req)
        if queue is self.waiting:
            self._waiting_priorities[req.priority] += 1
            self._waiting_online += req.is_online

    def _dequeue(self, queue: deque[Request], req: Request) -> None:
        queue.remove(req)
        if queue is self.waiting:
            self._waiting_priorities[req.priority] -= 1
            if not self._waiting_priorities[req.priority]:
                del self._waiting_priorities[req.priority]
            self._waiting_online -= req.is_online

    def _first_waiting(self) -> Request:
        """The first offline waiting request of the best priority value: a flex request before
        any batch line, otherwise the head (arrival order, preempted ones back at the front)."""
        best = min(self._waiting_priorities)
        return next(r for r in self.waiting if r.priority == best)

    def waiting_counts(self) -> tuple[int, int]:
        """(online, offline) requests waiting for a seat."""
        return len(self.online_waiting) + self._waiting_online, len(self.waiting) - self._waiting_online

    def has_unfinished(self) -> bool:
        return bool(self.online_waiting or self.waiting or self.running)

    def unfinished(self) -> list[Request]:
        return [*self.running, *self.online_waiting, *self.waiting]

    def check_integrity(self) -> None:
        """The block manager's own check over every request this scheduler holds; the waiting
        counts match the queues; no request is in two places."""
        self.blocks.check_integrity(self.unfinished())
        priorities = Counter(r.priority for r in self.waiting)
        assert self._waiting_priorities == priorities, "priority counts drifted"
        assert self._waiting_online == sum(r.is_online for r in self.waiting), "online count drifted"
        assert len({id(r) for r in self.unfinished()}) == len(self.unfinished()), "a request is queued twice"

    def schedule(self) -> ScheduledBatch:
        """Build one step.

        1. Online requests first: running ones in arrival order, then waiting ones. When
           they need a block or a seat, offline sequences are evicted (latest first), and
           only when no offline one is left does a later online request give way.
        2. Offline requests get what is left of the token budget, and, under `harvest`,
           only as much as the latency model predicts keeps the step within the online
           SLOs while online requests are present (`_latency_budget`; none present: the
           best batch).
           An offline sequence that does not fit is paused (keeps its blocks); a waiting
           one that holds a checkpoint gets its blocks and LOADS it, off the step, and
           runs in a later step once it is in.
        `fcfs` has no classes: everything is the offline path without a latency budget.
        """
        batch = ScheduledBatch()
        budget = self.config.max_num_batched_tokens
        by_arrival = sorted(self.running, key=lambda r: r.order)
        if self.config.has_classes:
            online = [r for r in by_arrival if r.is_online]
            if self.config.policy is Policy.HARVEST and self.config.cut_online_prefills:
                # decodes first: an online prefill is then cut to what they can wait for
                online.sort(key=lambda r: r.num_uncomputed_tokens > 1)
                batch.online_prefill_budget_s = self._online_prefill_budget()
            for req in online:
                budget -= self._schedule_running(req, budget, batch, online=True)
            while self.online_waiting and budget:
                if (n := self._admit(self.online_waiting, budget, batch, online=True)) is None:
                    break
                budget -= n
        if self.config.policy is Policy.ONLINE_ONLY:
            return batch
        if self.config.policy is Policy.HARVEST:
            batch.latency_budget_s = self._latency_budget()
        batch.offline_token_budget = self._fit(budget, 0, batch)
        self._free_a_seat_for_flex(batch)
        # when not one token fits (a longer context only costs more), the resident offline
        # requests pause without two latency predictions each: those ran on every busy online
        # step, and its decodes waited for them (22 paused requests: the scheduler's 0.2 ms
        # a step halved). Waiting ones are still admitted below: a checkpoint loads off the step.
        if batch.offline_token_budget:
            for req in [r for r in by_arrival if not (r.is_online and self.config.has_classes)]:
                budget -= self._schedule_running(req, budget, batch, online=False)
        while self.waiting and budget:
            if (n := self._admit(self.waiting, budget, batch, online=False)) is None:
                break
            budget -= n
        return batch

    def _latency_budget(self) -> float | None:
        """How long this step may take by the latency model: the TPOT target at most, less
        when an online request's deadline is near, less again by how much steps overrun the
        model lately. None when no online request is in the engine (offline then runs at the
        best batch). Planned to the headroom (0.8) throughout.

        Deadlines are per request: the TTFT target for one still waiting for its first
        token, and for a decoding one the time by which its next token keeps its mean TPOT
        within the headroom's share of the target (`_next_token_due`), less the reserve it
        keeps for a long step (`observe`). A request that lost time to other requests'
        prefills has none left to lend: its steps carry no offline work until it is back on
        schedule."""
        online = [r for r in (*self.running, *self.online_waiting) if r.is_online]
        if not online:
            return None
        slo, now = self.config.slo, self.now()
        budget = slo.tpot_s * slo.headroom
        for r in online:
            if r.first_token_time is None:
                budget = min(budget, (r.arrival_time + slo.ttft_s - now) * slo.headroom)
            else:
                budget = min(budget, self._next_token_due(r) - self.reserve_s - now)
        return max(0.0, budget / self.latency.margin())

    def _next_token_due(self, req: Request) -> float:
        """When `req`'s next token keeps its mean TPOT at the headroom's share of the target.

        The schedule itself is planned to the headroom, not only each step's share of the
        slack left: offline work planned against the target's own schedule takes a request's
        slack step by step until its mean sits on the target, and then any step that runs
        past its prediction makes it a miss (the coserve bench's harvest misses were such
        requests, 100-108 % of the target). Planned to 0.8 of it, a request keeps a fifth
        of a TPOT per token in hand however long it runs."""
        slo = self.config.slo
        return req.first_token_time + req.num_output_tokens * slo.tpot_s * slo.headroom

    def _online_prefill_budget(self) -> float | None:
        """How long a step that carries an online prompt's prefill may take: as long as the
        decoding online requests can wait for their next token (what each banked ahead of
        its next-token deadline, `_next_token_due`), at least a TPOT planned to the headroom.
        None when no online request is decoding, or the model is not fitted: nothing to cut for.

        An online-only engine runs a whole prompt (up to the step's token budget) in one
        step, and that step is its own tail: the decoding requests beside it take one long
        gap (the coserve bench's long steps were 384-token prefills, 2-3 TPOT targets). Cut
        into chunks sized to the decoders' slack, as Sarathi-Serve's stall-free batching
        does, the prompt costs them nothing; the prompt's own request pays a few steps of
        TTFT, and only while its TTFT target allows (`_cut_online_prefill`).

        Only for a lone prompt: with several pending (a burst), the steps carrying one's
        chunks carry the others' prefills too, so they run longer than the guard counts
        them, the cut prompt's TTFT slips, and the decoders pay for the chunks' repeated
        fixed costs all the same (in virtual time, the coserve bench's extra misses beside
        online-only's were such bursts)."""
        if not self.latency.fitted or self._online_prefills_pending() > 1:
            return None
        slo, now = self.config.slo, self.now()
        slack = [
            self._next_token_due(r) - now
            for r in self.running
            if r.is_online and r.first_token_time is not None and r.num_uncomputed_tokens == 1
        ]
        if not slack:
            return None
        return max(slo.tpot_s * slo.headroom, min(slack)) / self.latency.margin()

    def _online_prefills_pending(self) -> int:
        return len(self.online_waiting) + sum(
            1 for r in self.running if r.is_online and r.num_uncomputed_tokens > 1
        )

    def _cut_online_prefill(self, req: Request, n: int, computed: int, batch: ScheduledBatch) -> int:
        """The online prefill chunk of `req` this step: `n` tokens, or fewer when the step
        would outlast `batch.online_prefill_budget_s`, down to one block, and only while the
        request's own first token still comes in time over the chunks that remain."""
        limit = batch.online_prefill_budget_s
        if limit is None or n <= self.blocks.block_size:
            return n
        if (cut := self._fit(n, computed, batch, limit)) == n:
            return n
        cut = max(cut, self.blocks.block_size)
        slo = self.config.slo
        steps = -(-(req.num_tokens - computed) // cut)
        # each chunk's step counted at a whole TPOT target, not the planned `limit`: a slow
        # spell of the machine must not turn the cut into a TTFT miss
        if self.now() + steps * slo.tpot_s > req.arrival_time + slo.ttft_s * slo.headroom:
            return n  # cut, it could miss its TTFT: the decoders' slack is spent instead
        return cut

    def _joins_first_tokens(self, req: Request, n: int, computed: int, batch: ScheduledBatch) -> bool:
        """Whether a waiting online prompt's `n` tokens may join a step that already makes other
        prompts' first tokens. It waits for the next step only when that costs nobody a
        target: joining would push one of theirs past its TTFT target (and theirs were in time
        without it), while its own first token, a step later beside every prompt waiting now,
        would still be in time.

        An online-only engine puts every pending prompt into one step, up to the token budget,
        so in a burst all their first tokens come at the end of one long step; under harvest
        the burst often lands during a step in flight, and the prompts that wait for it
        arrive together. In virtual time, on the coserve bench's profile, harvest's misses
        beside online-only's were such bursts: five prompts in one 22 ms step, every first
        token 0-4% past the target, where the first four alone would have made it. Holding a
        prompt back whenever the others gain, even at its own target, cost more on the CPU
        than it saved: each extra step pays its fixed cost, and predictions are noisy there."""
        if self.config.policy is not Policy.HARVEST or not self.latency.fitted:
            return True
        ttft = self.config.slo.ttft_s
        # the earliest TTFT deadline of the prompts whose first token this step makes
        due = min(
            (r.arrival_time + ttft for r, k in zip(batch.requests, batch.num_new_tokens)
             if r.is_online and r.first_token_time is None and r.num_computed_tokens + k == r.num_tokens),
            default=None,
        )  # fmt: skip
        if due is None:
            return True
        now, margin, predict = self.now(), self.latency.margin(), self.latency.predict
        if now + predict(batch.shape.with_added(n, computed)) * margin <= due:
            return True
        end = now + predict(batch.shape) * margin
        if end > due:
            return True  # theirs are late anyway
        # the next step at best: everyone in this one decodes, and every prompt waiting now
        # (this one and those behind it, which wait with it) prefills: counting this one alone,
        # a burst's prompts were held back one step after another until they missed
        nxt = BatchShape()
        for r, k in zip(batch.requests, batch.num_new_tokens):
            if r.is_online:
                nxt.add(1, r.num_computed_tokens + k)
        for r in self.online_waiting:
            nxt.add(r.num_tokens - r.num_computed_tokens, r.num_computed_tokens)
        return end + predict(nxt) * margin > req.arrival_time + ttft

    def observe(self, batch: ScheduledBatch, seconds: float) -> None:
        """Learn the reserve: how far the steps with online work that overran the TPOT target
        overran it.

        Some steps run long whatever offline work they carry: an online prompt's prefill
        (an online-only engine's own tail), a slow spell of the machine. A decoding request
        absorbs such a step only from the slack it banked ahead of its TPOT deadline, and
        offline work planned up to the deadline leaves it none: the coserve bench's misses
        were short requests that met one or two such steps. So offline work may only use the
        slack a request holds beyond `reserve_s`, a high quantile of the recent overruns:
        rare or not, one is likely within a request's life. Learned, so a device whose
        prefills are short keeps little."""
        tpot = self.config.slo.tpot_s
        if self.config.policy is not Policy.HARVEST or batch.offline_only or seconds <= tpot:
            return
        self._overruns.append(seconds - tpot)
        self._since_reserve += 1
        if self._since_reserve >= 8:
            ordered = sorted(self._overruns)
            self.reserve_s = ordered[int(self.config.slo.reserve_quantile * (len(ordered) - 1))]
            self._since_reserve = 0

    def _schedule_running(self, req: Request, budget: int, batch: ScheduledBatch, online: bool) -> int:
        if req not in self.running or req.status is not RequestStatus.RUNNING:
            return 0  # evicted earlier in this step
        n = min(req.num_uncomputed_tokens, budget)
        if not online:
            n = self._fit(n, req.num_computed_tokens, batch)
        elif n > 1:
            n = self._cut_online_prefill(req, n, req.num_computed_tokens, batch)
        if n == 0 or not self._allocate(req, n, batch, online):
            return 0  # paused this step (or evicted)
        batch.add(req, n)
        return n

    def _admit(self, queue: deque[Request], budget: int, batch: ScheduledBatch, online: bool) -> int | None:
        """Start (or restart) the request at the head of `queue`: its longest cached prefix
        is taken as computed. One whose checkpoint reaches further gets the blocks for it and
        waits in LOADING (no tokens this step). Returns the tokens scheduled, None if it
        could not start.

        Offline, that is the first request of the lowest priority value in the queue's order
        (arrival, preempted ones back at the front): a flex request before any batch line,
        and when batch lines hold every seat it takes the latest one's (`_free_a_seat_for_flex`)."""
        req = queue[0] if online else self._first_waiting()
        if len(self.running) >= self.config.max_num_seqs and not (online and self._evict(batch, req)):
            return None
        hit = self.blocks.cached_prefix(req)
        cached = len(hit) * self.blocks.block_size
        load = req.checkpointed_tokens > cached and req.num_computed_tokens == 0
        before = req.num_computed_tokens
        if load:
            n, computed = 0, 0  # the blocks its checkpoint fills; computed once they are in
            if not self._allocate(req, req.checkpointed_tokens, batch, online, hit):
                return None
        else:
            computed = max(cached, before)
            n = min(req.num_tokens - computed, budget)
            if not online:
                n = self._fit(n, computed, batch)
            elif n > 1:
                n = self._cut_online_prefill(req, n, computed, batch)
                if not self._joins_first_tokens(req, n, computed, batch):
                    return None
            req.num_computed_tokens = computed
            if n == 0 or not self._allocate(req, n, batch, online, hit):
                req.num_computed_tokens = before
                return None
        self._dequeue(queue, req)  # not popleft(): an eviction above may have put a request before it
        if req.first_scheduled_time is None:
            req.first_scheduled_time = self.now()
        self.running.append(req)
        if self.blocks.enable_prefix_caching:
            batch.prefix_queried_tokens += req.num_tokens
            batch.prefix_hit_tokens += cached
        if load:
            req.status = RequestStatus.LOADING
            batch.loads.append((req, len(hit)))
        else:
            req.status = RequestStatus.RUNNING
            batch.add(req, n)
        return n

    def _free_a_seat_for_flex(self, batch: ScheduledBatch) -> None:
        """When every seat is taken and the first waiting offline request is of a better
        priority class than a running offline one (a flex request, batch lines holding the
        seats), the latest of those gives its seat up, as it would to an online request.
        Before the running offline requests join the step: a request in it cannot be evicted.
        Within a class a request waits for a seat to come free."""
        if not self.waiting or len(self.running) < self.config.max_num_seqs:
            return
        req = self._first_waiting()
        classes = self.config.has_classes
        if any(r.priority > req.priority for r in self.running if not (r.is_online and classes)):
            self._evict(batch, req)

    def _allocate(self, req: Request, n: int, batch: ScheduledBatch, online: bool,
                  cached: Sequence[int] = ()) -> bool:  # fmt: skip
        while not self.blocks.allocate(req, req.num_computed_tokens + n, cached):
            if not self._evict(batch, req, allow_online=online):
                if req.status is RequestStatus.RUNNING and not online:
                    return False  # offline: stay paused with the blocks it has
                if req.status is RequestStatus.RUNNING:
                    self._preempt(req, batch)  # an online request with nothing left to evict
                return False
        return True

    def _evict(self, batch: ScheduledBatch, for_req: Request, allow_online: bool = False) -> bool:
        """Preempt the latest-arrived running request not in this step, offline ones first.

        An online request may displace any offline one; otherwise only later arrivals give
        way, so the oldest work always progresses and nothing thrashes.
        """
        classes = self.config.has_classes
        online_for = for_req.is_online and classes
        candidates = [r for r in self.running if r is not for_req and r not in batch.requests]
        offline = [r for r in candidates if not (r.is_online and classes)]
        if not online_for:
            offline = [r for r in offline if r.order > for_req.order]
        later_online = [r for r in candidates if r.is_online and classes and r.order > for_req.order]
        pool = offline or (later_online if allow_online else [])
        if not pool:
            return False
        self._preempt(max(pool, key=lambda r: r.order), batch)
        return True

    def _preempt(self, req: Request, batch: ScheduledBatch) -> None:
        self.running.remove(req)
        if req.status is RequestStatus.LOADING:
            self.cancel_load(req)  # before its blocks can go to anyone else
        self.blocks.free(req)
        # what it loses is counted when it is computed again: at readmission the prefix cache
        # or its checkpoint may serve much of it back
        req.max_computed_tokens = max(req.max_computed_tokens, req.num_computed_tokens)
        req.num_computed_tokens = 0
        req.checkpointed_tokens = req.checkpointed_tokens if self.config.checkpoints else 0
        req.num_preemptions += 1
        req.status = RequestStatus.WAITING
        self._enqueue(req, front=True)
        batch.preempted.append(req)

    def _fit(self, n: int, context_len: int, batch: ScheduledBatch, limit: float | None = None) -> int:
        """The most of `n` new tokens (at `context_len`) the step's latency budget (or
        `limit`) admits."""
        limit = batch.latency_budget_s if limit is None else limit
        if limit is None or n == 0 or not self.latency.fitted:
            return n
        if self.latency.predict(batch.shape.with_added(n, context_len)) <= limit:
            return n
        lo, hi = 0, n  # predict() grows with n: binary search the largest fit
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.latency.predict(batch.shape.with_added(mid, context_len)) <= limit:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def finish(self, req: Request) -> None:
        if req in self.running:
            self.running.remove(req)
        for queue in (self.online_waiting, self.waiting):
            if req in queue:
                self._dequeue(queue, req)
        if req.status is RequestStatus.LOADING:
            self.cancel_load(req)
        self.blocks.free(req)
