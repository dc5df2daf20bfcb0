"""The scheduler and block manager on their own: made-up requests, a fake runner, no model.

The fake runner does what the engine's update does to a scheduled batch (computed tokens
advance, one token is sampled when they catch up, a request ends at max_tokens) and, under
`harvest`, checkpoints every full block of a running offline request, as a checkpoint
store that keeps up would. The block manager's `check_integrity` runs after every step.
The latency model is a fake with known weights: `MS_PER_TOKEN` per token, nothing else.
"""

from __future__ import annotations

import itertools
import time

import pytest

from harvest.engine import SamplingParams
from harvest.engine.block_manager import BlockManager
from harvest.engine.config import SchedulerConfig, SLOConfig
from harvest.engine.latency_model import LatencyModel
from harvest.engine.request import Request, RequestClass, RequestStatus
from harvest.engine.scheduler import ScheduledBatch, Scheduler
from harvest.protocol.types import FLEX_PRIORITY

BLOCK = 4
MS_PER_TOKEN = 1.0
SLO = SLOConfig(ttft_s=1.0, tpot_s=0.1, headroom=0.8)  # a step may take 80 ms: 80 tokens
_token_ids = itertools.count(10)  # every prompt its own tokens: no request shares a prefix


def fake_latency(ms_per_token: float | None = MS_PER_TOKEN) -> LatencyModel:
    """A latency model that predicts `ms_per_token` per token (None: not fitted, no limit)."""
    model = LatencyModel()
    if ms_per_token is not None:
        model.weights = [0.0, ms_per_token / 1e3, 0.0, 0.0, 0.0, 0.0]
    return model


def make_scheduler(
    policy: str = "harvest",
    num_blocks: int = 64,
    max_num_seqs: int = 8,
    max_num_batched_tokens: int = 256,
    ms_per_token: float | None = MS_PER_TOKEN,
) -> Scheduler:
    config = SchedulerConfig(
        max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs, policy=policy, slo=SLO
    )
    blocks = BlockManager(num_blocks, BLOCK, enable_prefix_caching=False)
    return Scheduler(config, blocks, fake_latency(ms_per_token))


def make_request(
    prompt_len: int, max_tokens: int = 4, online: bool = False, rid: str = "", priority: int = 0
) -> Request:
    prompt = [next(_token_ids) for _ in range(prompt_len)]
    request_class = RequestClass.ONLINE if online else RequestClass.OFFLINE
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    return Request(rid or f"r{prompt[0]}", prompt, params, request_class, priority=priority)


def make_requests(n: int, prompt_len: int, **kwargs) -> list[Request]:
    return [make_request(prompt_len, **kwargs) for _ in range(n)]


def step(sched: Scheduler) -> ScheduledBatch:
    """One step: schedule, then what the engine's update would do (a load completes at once:
    its request joins the next step's batch); integrity checked."""
    batch = sched.schedule()
    for req, _ in batch.loads:
        req.num_computed_tokens = req.checkpointed_tokens
        req.status = RequestStatus.RUNNING
    for req, n in zip(batch.requests, batch.num_new_tokens):
        assert n > 0 and req.num_computed_tokens + n <= req.num_tokens
        req.num_computed_tokens += n
        if req.num_computed_tokens == req.num_tokens:
            req.token_ids.append(next(_token_ids))
            req.first_token_time = req.first_token_time or time.monotonic()
            if req.num_output_tokens >= req.params.max_tokens:
                sched.finish(req)
                req.status = RequestStatus.FINISHED
    if sched.config.checkpoints:
        for req in sched.running:
            if not req.is_online:
                req.checkpointed_tokens = req.num_computed_tokens // BLOCK * BLOCK
    sched.blocks.check_integrity(sched.running)  # the running requests hold every used block
    sched.check_integrity()
    assert len(sched.running) <= sched.config.max_num_seqs
    assert batch.num_tokens <= sched.config.max_num_batched_tokens
    return batch


def run(sched: Scheduler, max_steps: int = 500) -> list[ScheduledBatch]:
    batches = []
    while sched.has_unfinished():
        batches.append(step(sched))
        assert len(batches) < max_steps, "no progress"
    assert sched.blocks.num_used_blocks == 0
    return batches


def ids(requests) -> list[str]:
    return [r.request_id for r in requests]


# ---------------------------------------------------------------- policies


def test_fcfs_has_one_queue_online_waits_behind_offline_for_a_seat():
    sched = make_scheduler("fcfs", max_num_seqs=2)
    offline = make_requests(2, 8, max_tokens=6)
    online = make_request(8, online=True)
    for r in [*offline, online]:
        sched.add(r)
    assert ids(step(sched).requests) == ids(offline)
    for _ in range(20):
        if online in step(sched).requests:
            break
    assert online.status is RequestStatus.RUNNING
    assert any(r.is_finished for r in offline), "online got a seat only once an offline request ended"
    assert not any(b.preempted for b in run(sched))


def test_online_only_never_schedules_offline():
    sched = make_scheduler("online-only")
    offline = make_request(8)
    online = make_requests(3, 8, online=True)
    for r in [offline, *online]:
        sched.add(r)
    batches = []
    while not all(r.is_finished for r in online):
        batches.append(step(sched))
        assert offline not in batches[-1].requests and batches[-1].offline_token_budget == 0
    assert offline.status is RequestStatus.WAITING and offline.num_computed_tokens == 0


@pytest.mark.parametrize("policy", ["harvest", "priority-recompute"])
def test_online_goes_first_in_the_token_budget(policy):
    sched = make_scheduler(policy, max_num_batched_tokens=32, ms_per_token=None)
    offline = make_request(40)
    online = make_request(20, online=True)
    sched.add(offline)
    sched.add(online)  # arrived later, scheduled first
    batch = step(sched)
    assert ids(batch.requests) == ids([online, offline])
    assert batch.num_new_tokens == [20, 12]  # offline gets what is left of 32


def test_every_request_finishes_under_each_policy_with_a_tiny_pool():
    for policy in ["fcfs", "priority-recompute", "harvest"]:
        sched = make_scheduler(policy, num_blocks=8, max_num_seqs=4, max_num_batched_tokens=16)
        requests = [make_request(6 + i % 5, max_tokens=3 + i % 4, online=i % 3 == 0) for i in range(12)]
        for r in requests:
            sched.add(r)
        batches = run(sched)
        assert all(r.is_finished and r.num_output_tokens == r.params.max_tokens for r in requests), policy
        assert sum(len(b.preempted) for b in batches) > 0, f"{policy}: the pool never ran short"


# ---------------------------------------------------------------- preemption


def test_online_evicts_the_latest_offline_first_and_never_online():
    # 6 blocks: three offline requests of 2 blocks each fill the pool (7 prompt tokens and
    # the first sampled one: their next step needs no new block)
    sched = make_scheduler("priority-recompute", num_blocks=6, ms_per_token=None)
    first, second, third = offline = make_requests(3, 7, max_tokens=3)
    for r in offline:
        sched.add(r)
    step(sched)
    assert sched.blocks.num_free_blocks == 0
    online = make_request(8, online=True)
    sched.add(online)
    batch = step(sched)
    assert online in batch.requests
    assert ids(batch.preempted) == ids([third])  # the latest arrival gives way
    assert first.status is second.status is RequestStatus.RUNNING


def test_an_offline_request_only_displaces_later_offline_ones():
    # two offline requests decode into a pool with no spare block: the later one is evicted
    # for the earlier, never the other way round, so the oldest work always progresses
    sched = make_scheduler("priority-recompute", num_blocks=4, ms_per_token=None)
    early, late = make_request(8, max_tokens=4), make_request(8, max_tokens=4)
    sched.add(early)
    sched.add(late)
    preempted = [r for b in run(sched) for r in b.preempted]
    assert preempted and all(r is late for r in preempted)
    assert early.num_preemptions == 0


def test_online_requests_claim_seats_from_offline():
    sched = make_scheduler("harvest", max_num_seqs=2, ms_per_token=None)
    offline = make_requests(2, 4, max_tokens=8)
    for r in offline:
        sched.add(r)
    step(sched)
    online = make_request(4, online=True)
    sched.add(online)
    batch = step(sched)
    assert online in batch.requests and ids(batch.preempted) == ids(offline[1:])


@pytest.mark.parametrize("policy", ["harvest", "priority-recompute"])
def test_a_flex_request_takes_a_seat_from_the_latest_batch_line_when_none_is_free(policy):
    """Flex requests are served from harvested capacity like batch lines, but someone waits
    on each: when batch lines hold every seat, the latest one gives its seat up (harvest
    keeps its checkpoint) rather than the flex request waiting for one to finish."""
    sched = make_scheduler(policy, max_num_seqs=2, ms_per_token=None)
    batch_lines = [make_request(4, max_tokens=40) for _ in range(3)]
    for r in batch_lines:
        sched.add(r)
    step(sched)
    step(sched)
    flex = make_request(4, max_tokens=2, priority=FLEX_PRIORITY)
    sched.add(flex)
    batch = step(sched)
    assert flex in batch.requests and ids(batch.preempted) == ids([batch_lines[1]])
    while not flex.is_finished:
        assert batch_lines[0].status is RequestStatus.RUNNING  # the earliest keeps its seat
        step(sched)
    # a batch line never takes a seat from another: the third waits for one to come free
    assert batch_lines[2].status is RequestStatus.WAITING and batch_lines[2].num_preemptions == 0
    run(sched)
    assert all(r.is_finished for r in batch_lines)


def test_batch_lines_give_way_before_flex_requests():
    # as test_online_evicts_the_latest_offline_first_and_never_online, the latest offline
    # arrival a flex request: the latest batch line is evicted instead
    sched = make_scheduler("priority-recompute", num_blocks=6, ms_per_token=None)
    first, second = make_requests(2, 7, max_tokens=3)
    flex = make_request(7, max_tokens=3, priority=FLEX_PRIORITY)
    for r in (first, second, flex):
        sched.add(r)
    step(sched)
    assert sched.blocks.num_free_blocks == 0
    sched.add(make_request(8, online=True))
    assert ids(step(sched).preempted) == ids([second])
    # and a flex request short of a block evicts a batch line, never the other way round
    sched = make_scheduler("priority-recompute", num_blocks=4, ms_per_token=None)
    early, flex = make_request(8, max_tokens=4), make_request(8, max_tokens=4, priority=FLEX_PRIORITY)
    sched.add(early)
    sched.add(flex)
    preempted = [r for b in run(sched) for r in b.preempted]
    assert preempted and all(r is early for r in preempted)
    assert flex.num_preemptions == 0


def test_harvest_resumes_a_preempted_offline_request_from_its_checkpoint():
    sched = make_scheduler("harvest", num_blocks=4, ms_per_token=None)
    offline = make_request(8, max_tokens=4)
    sched.add(offline)
    step(sched)  # its prompt computed and checkpointed (2 full blocks)
    assert offline.checkpointed_tokens == 8
    online = make_request(12, max_tokens=2, online=True)
    sched.add(online)
    batch = step(sched)
    assert ids(batch.preempted) == ids([offline])
    while not online.is_finished:  # the pool is full of online blocks: no room to load into
        batch = step(sched)
        assert not batch.loads and batch.recomputed_tokens == 0
    uncheckpointed = offline.num_tokens - 8
    batch = step(sched)
    assert [(r.request_id, first) for r, first in batch.loads] == [(offline.request_id, 0)]
    assert offline not in batch.requests  # loading: no tokens until its blocks are in
    batch = step(sched)
    assert batch.requests == [offline] and batch.num_new_tokens == [uncheckpointed]  # only what it lacks
    assert sum(b.recomputed_tokens for b in [batch, *run(sched)]) == 0  # the checkpoint held it all
    assert offline.is_finished


def test_a_checkpoint_loads_beside_online_work_and_joins_the_next_batch():
    """Loading copies blocks off the step, so it need not wait for online work to end."""
    sched = make_scheduler("harvest", num_blocks=64)
    resumed = make_request(12, max_tokens=4)
    resumed.checkpointed_tokens = 8  # as a shard resumed from the queue brings it
    online = make_request(4, max_tokens=4, online=True)
    for r in [online, resumed]:
        sched.add(r)
    batch = step(sched)
    assert online in batch.requests and resumed not in batch.requests
    assert batch.loads == [(resumed, 0)]
    batch = step(sched)
    assert resumed in batch.requests
    assert batch.num_new_tokens[batch.requests.index(resumed)] == 4  # 12 - the 8 it loaded


def test_priority_recompute_recomputes_a_preempted_offline_request():
    sched = make_scheduler("priority-recompute", num_blocks=4, ms_per_token=None)
    offline = make_request(8, max_tokens=4)
    sched.add(offline)
    step(sched)
    sched.add(make_request(12, max_tokens=2, online=True))
    batch = step(sched)
    assert ids(batch.preempted) == ids([offline]) and offline.checkpointed_tokens == 0
    # counted as it is computed again, once readmitted: its prompt, not the token it sampled
    assert sum(b.recomputed_tokens for b in [batch, *run(sched)]) == 8
    assert offline.is_finished


# ---------------------------------------------------------------- latency budget


def test_harvest_sizes_offline_work_to_the_latency_budget():
    sched = make_scheduler("harvest", max_num_batched_tokens=256)
    online = make_request(8, online=True)
    offline = make_requests(3, 100)
    for r in [online, *offline]:
        sched.add(r)
    batch = step(sched)
    assert batch.latency_budget_s == pytest.approx(SLO.tpot_s * SLO.headroom)  # 80 ms
    assert batch.num_new_tokens[0] == 8 and batch.num_tokens == 80  # online 8, offline 72 at 1 ms each
    assert sched.latency.predict(batch.shape) <= batch.latency_budget_s
    assert sched.latency.predict(batch.shape.with_added(1, 0)) > batch.latency_budget_s


def test_harvest_runs_the_best_batch_without_online_work():
    sched = make_scheduler("harvest", max_num_batched_tokens=256)
    for r in make_requests(3, 100):
        sched.add(r)
    batch = step(sched)
    assert batch.latency_budget_s is None and batch.num_tokens == 256


def test_priority_recompute_has_no_latency_budget():
    sched = make_scheduler("priority-recompute", max_num_batched_tokens=256)
    for r in [make_request(8, online=True), *make_requests(3, 100)]:
        sched.add(r)
    batch = step(sched)
    assert batch.latency_budget_s is None and batch.num_tokens == 256


def test_an_online_request_past_its_deadline_gets_steps_without_offline_work():
    sched = make_scheduler("harvest")
    late = make_request(8, online=True)
    late.arrival_time -= SLO.ttft_s  # its first token is already due
    sched.add(late)
    for r in make_requests(2, 40):
        sched.add(r)
    batch = step(sched)
    assert batch.latency_budget_s == 0.0
    assert ids(batch.requests) == ids([late]) and batch.offline_token_budget == 0


def test_the_budget_shrinks_by_the_models_overrun_margin():
    sched = make_scheduler("harvest")
    sched.latency._margin = 2.0  # steps lately took twice their prediction
    for r in [make_request(8, online=True), *make_requests(2, 100)]:
        sched.add(r)
    batch = step(sched)
    assert batch.latency_budget_s == pytest.approx(SLO.tpot_s * SLO.headroom / 2)
    assert batch.num_tokens == 40


def test_a_decoding_request_keeps_the_learned_reserve_before_lending_slack():
    """Steps with online work that overran the TPOT target teach a reserve; a decoding
    request lends offline work only the slack it holds beyond it."""
    sched = make_scheduler("harvest")
    online = make_request(8, max_tokens=50, online=True)
    sched.add(online)
    for r in make_requests(2, 100):
        sched.add(r)
    step(sched)  # the online request's prefill: its first token
    with_online = sched.schedule()  # not run: the batch only teaches the reserve
    for overrun_s in [0.001] * 7 + [0.004]:  # eight long steps: the quantile is learned
        sched.observe(with_online, SLO.tpot_s + overrun_s)
    sched.observe(with_online, SLO.tpot_s / 2)  # a step within target teaches nothing
    assert sched.reserve_s == pytest.approx(0.001)  # the 0.9 quantile of the 8 overruns
    offline_only = ScheduledBatch(requests=make_requests(1, 8))
    sched.observe(offline_only, 1.0)  # an offline-only step has no online request to delay
    assert len(sched._overruns) == 8
    # the next token is due one planned TPOT (target x headroom) after the first: the budget
    # is that less the reserve
    online.first_token_time = time.monotonic()
    budget = sched._latency_budget()
    assert budget == pytest.approx(SLO.tpot_s * SLO.headroom - 0.001, rel=0.05)
    online.first_token_time = time.monotonic() + SLO.tpot_s  # one that banked a TPOT of slack
    assert sched._latency_budget() == pytest.approx(SLO.tpot_s * SLO.headroom)


# ---------------------------------------------------------------- online prefill chunks


def _decoding_online(sched: Scheduler) -> Request:
    """An online request that has its first token and no slack banked: its next is due now + 1 TPOT."""
    decoding = make_request(8, max_tokens=50, online=True)
    sched.add(decoding)
    step(sched)
    _due_in_one_tpot(decoding)
    return decoding


def _due_in_one_tpot(req: Request) -> None:
    """Its next token due one planned TPOT (the target times the headroom) from now."""
    req.first_token_time = time.monotonic() - (req.num_output_tokens - 1) * SLO.tpot_s * SLO.headroom


@pytest.mark.parametrize("policy", ["harvest", "online-only"])
def test_a_long_online_prompt_is_cut_to_what_the_decoding_requests_can_wait(policy):
    """Under harvest a 200-token prompt beside a request due its next token in one TPOT (80 ms
    planned, 1 ms a token) runs 79 tokens a step, not all 200 in one 201 ms step; its first
    token still comes within its TTFT target. online-only runs it whole, as a plain engine does."""
    sched = make_scheduler(policy)
    decoding = _decoding_online(sched)
    prompt = make_request(200, online=True)
    sched.add(prompt)
    batch = step(sched)
    assert ids(batch.requests) == ids([decoding, prompt])
    if policy == "online-only":
        assert batch.num_new_tokens == [1, 200]
        return
    assert batch.online_prefill_budget_s == pytest.approx(SLO.tpot_s * SLO.headroom, rel=0.05)
    assert batch.num_new_tokens == [1, 79]
    assert sched.latency.predict(batch.shape) <= batch.online_prefill_budget_s
    chunks = [79]
    while prompt.first_token_time is None:
        _due_in_one_tpot(decoding)
        chunks.append(step(sched).num_new_tokens[1])
    assert chunks == [79, 79, 42]


def test_an_online_prompt_is_not_cut_past_its_own_ttft_target():
    """Cut into 79-token chunks, a 200-token prompt would take three steps; one whose TTFT target
    leaves less than that runs whole (the decoders' slack is spent instead)."""
    sched = make_scheduler("harvest")
    _decoding_online(sched)
    prompt = make_request(200, online=True)
    prompt.arrival_time -= SLO.ttft_s * SLO.headroom - 0.2  # 200 ms left: three 80 ms steps do not fit
    sched.add(prompt)
    assert step(sched).num_new_tokens == [1, 200]


def test_decoders_with_banked_slack_let_a_prompt_run_whole():
    sched = make_scheduler("harvest")
    decoding = _decoding_online(sched)
    decoding.first_token_time = time.monotonic() + 1.0  # a second ahead of schedule
    prompt = make_request(200, online=True)
    sched.add(prompt)
    assert step(sched).num_new_tokens == [1, 200]


def test_a_request_whose_mean_tpot_reached_the_target_lends_no_more():
    """The next-token schedule is planned to the headroom: a request whose tokens so far came
    at the full target pace is behind that plan, and its steps carry no offline work until it
    is back on it (on the target's own schedule it would still lend 80 ms a step, and the
    next step that ran past its prediction would make it a miss)."""
    sched = make_scheduler("harvest")
    online = make_request(8, max_tokens=50, online=True)
    sched.add(online)
    for r in make_requests(2, 100):
        sched.add(r)
    while online.num_output_tokens < 5:
        step(sched)
    n = online.num_output_tokens
    online.first_token_time = time.monotonic() - (n - 1) * SLO.tpot_s  # mean TPOT so far: the target
    assert sched._latency_budget() == 0.0
    assert all(r.is_online for r in step(sched).requests)
    online.first_token_time = time.monotonic() - (n - 1) * SLO.tpot_s * SLO.headroom / 2  # well ahead
    assert sched._latency_budget() == pytest.approx(SLO.tpot_s * SLO.headroom)


def test_the_waiting_counts_follow_admissions_preemptions_and_aborts():
    """The scheduler counts its waiting requests by priority and class as they come and go,
    rather than scanning a backlog of thousands every step: the counts must match the queues
    after every kind of move (`step` checks them too)."""
    sched = make_scheduler("harvest", max_num_seqs=2, ms_per_token=None)
    lines = [make_request(4, max_tokens=6) for _ in range(4)]
    flex = make_request(4, max_tokens=2, priority=FLEX_PRIORITY)
    for r in lines:
        sched.add(r)
    assert sched.waiting_counts() == (0, 4)
    step(sched)  # two admitted
    assert sched.waiting_counts() == (0, 2)
    sched.add(flex)
    sched.add(make_request(4, online=True))
    assert sched.waiting_counts() == (1, 3)
    batch = step(sched)  # the flex and the online request each take a batch line's seat
    assert flex in batch.requests and len(batch.preempted) == 2
    assert sched.waiting_counts() == (0, 4)
    sched.finish(lines[3])  # an abort of a request still waiting
    sched.check_integrity()
    assert sched.waiting_counts() == (0, 3)
    run(sched)
    assert sched.waiting_counts() == (0, 0) and not sched._waiting_priorities
    # fcfs has one queue for both classes: its counts still tell them apart
    sched = make_scheduler("fcfs", ms_per_token=None)
    sched.add(make_request(4))
    sched.add(make_request(4, online=True))
    assert sched.waiting_counts() == (1, 1)
    run(sched)


@pytest.mark.parametrize("policy", ["harvest", "online-only"])
def test_a_prompt_that_would_make_others_miss_their_first_token_waits_a_step(policy):
    """Two 200-token prompts with 500 ms of their TTFT target left and a third that just
    arrived, at 1 ms a token: in one 600 ms step the first two first tokens would come late.
    Under harvest the first two run (400 ms, in time) and the third waits for the next step,
    where its first token still comes within its own target. online-only runs all three in
    one step, as a plain engine does."""
    sched = make_scheduler(policy, num_blocks=256, max_num_batched_tokens=1024)
    prompts = [make_request(200, online=True) for _ in range(3)]
    for p in prompts[:2]:
        p.arrival_time -= SLO.ttft_s - 0.5
    for p in prompts:
        sched.add(p)
    batch = step(sched)
    if policy == "online-only":
        assert batch.num_new_tokens == [200, 200, 200]
        return
    assert ids(batch.requests) == ids(prompts[:2])
    assert sched.latency.predict(batch.shape) <= 0.5
    nxt = step(sched)  # the two decode, the third prefills (cut for them, within its own target)
    assert ids(nxt.requests) == ids(prompts) and nxt.num_new_tokens[:2] == [1, 1]


def test_a_prompt_is_held_back_only_if_it_makes_its_target_behind_all_that_wait_with_it():
    """As above with a second 300-token prompt behind the third: held back, the third would run
    in the next step beside the fourth (602 ms, past its own target), not alone (302 ms, in
    time): it joins, and the fourth with it."""
    sched = make_scheduler("harvest", num_blocks=512, max_num_batched_tokens=2048)
    first = [make_request(200, online=True) for _ in range(2)]
    late = [make_request(300, online=True) for _ in range(2)]
    for p in first:
        p.arrival_time -= SLO.ttft_s - 0.5
    for p in first + late:
        sched.add(p)
    assert step(sched).num_new_tokens == [200, 200, 300, 300]


@pytest.mark.parametrize("left_s", [0.5, 0.1])
def test_a_prompt_is_not_held_back_at_the_cost_of_its_own_first_token(left_s):
    """Three 200-token prompts that arrived together: holding the third back would keep the
    first two in time (500 ms left) but make its own first token late a step later, so it
    joins; and with 100 ms left the first two are late whatever joins them. Either way all
    three run in one step."""
    sched = make_scheduler("harvest", num_blocks=256, max_num_batched_tokens=1024)
    prompts = [make_request(200, online=True) for _ in range(3)]
    for p in prompts:
        p.arrival_time -= SLO.ttft_s - left_s
        sched.add(p)
    assert step(sched).num_new_tokens == [200, 200, 200]


def test_prompts_arriving_together_are_not_cut():
    """The cut protects decoders from one prompt's long prefill. With two prompts pending, the
    steps that would carry one prompt's chunks carry the other's prefill too, longer than the
    cut's TTFT guard counts them: the cut stands aside and both run whole, as online-only runs them."""
    sched = make_scheduler("harvest", num_blocks=128)
    _decoding_online(sched)
    first, second = make_request(150, online=True), make_request(100, online=True)
    sched.add(first)
    sched.add(second)
    batch = step(sched)
    assert batch.online_prefill_budget_s is None
    assert batch.num_new_tokens == [1, 150, 100]
    # alone, the same 150-token prompt is cut (79 tokens a step, as above)
    sched = make_scheduler("harvest")
    _decoding_online(sched)
    sched.add(make_request(150, online=True))
    assert step(sched).num_new_tokens == [1, 79]
