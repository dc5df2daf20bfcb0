"""Co-serving in one engine: classes, preemption, KV checkpoints, layer-level abort, adaptive batching."""

from __future__ import annotations

import time
from contextlib import contextmanager

import pytest

from harvest.checkpoint.store import HostCheckpointStore
from harvest.engine import FinishReason, SamplingParams
from tests.helpers import make_engine, make_prompts, run_checked, step_checked

GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
ONLINE = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)


def reference(model, prompts, params=GREEDY):
    return [o.token_ids for o in make_engine(model).generate(prompts, params)]


def fill_with_offline(engine, n: int, prompt_len: int = 20):
    prompts = make_prompts(engine, [prompt_len + i for i in range(n)])
    ids = [engine.add_request(p, GREEDY, request_id=f"off-{i}") for i, p in enumerate(prompts)]
    for _ in range(3):
        step_checked(engine)
    return prompts, ids


@pytest.mark.parametrize("policy", ["harvest", "priority-recompute"])
@pytest.mark.parametrize("full", ["blocks", "seats"])
def test_online_gets_first_token_within_one_step_when_offline_fills_the_engine(tiny_model, policy, full):
    kwargs = {"num_blocks": 30} if full == "blocks" else {"max_num_seqs": 4}
    engine = make_engine(tiny_model, policy=policy, **kwargs)
    fill_with_offline(engine, 6)
    assert engine.scheduler.waiting, "offline work must be waiting for room"
    if full == "blocks":  # the online prompt needs more blocks than are free
        assert engine.block_manager.num_free_blocks * 4 < 30
    else:
        assert len(engine.scheduler.running) == 4
    # a prompt sharing no prefix with the offline ones: the prefix cache would serve part of it
    rid = engine.add_request(make_prompts(engine, [30], start=100)[0], ONLINE, request_class="online")
    outs = step_checked(engine)
    assert rid in {o.request_id for o in outs}
    assert engine.last_step.preemptions >= 1
    done = run_checked(engine)
    assert all(o.finish_reason == FinishReason.LENGTH for o in done.values())


def test_fcfs_makes_online_wait_behind_offline(tiny_model):
    engine = make_engine(tiny_model, policy="fcfs", max_num_seqs=4)
    fill_with_offline(engine, 4)
    rid = engine.add_request(make_prompts(engine, [9])[0], ONLINE, request_class="online")
    assert rid not in {o.request_id for o in step_checked(engine)}


def test_online_only_rejects_offline(tiny_model):
    engine = make_engine(tiny_model, policy="online-only")
    with pytest.raises(ValueError, match="online-only"):
        engine.add_request([1, 2, 3], GREEDY)
    assert not engine.has_unfinished()  # the rejected request left nothing behind
    rid = engine.add_request([5, 6, 7], ONLINE, request_class="online")
    assert rid in run_checked(engine)


def preempt_repeatedly(engine, times: int, online_len: int = 60) -> int:
    """Push online requests that need the whole pool; returns how many preemptions happened.
    Each prompt shares no prefix with the offline ones or the earlier online ones (a cached
    prefix would need fewer blocks)."""
    preemptions = 0
    for k in range(times):
        for _ in range(2):
            step_checked(engine)
        before = engine.stats.preemptions
        prompt = make_prompts(engine, [online_len], start=100 + 7 * k)[0]
        rid = engine.add_request(prompt, ONLINE, request_class="online", request_id=f"online-{k}")
        while not any(o.request_id == rid and o.finished for o in step_checked(engine)):
            pass
        preemptions += engine.stats.preemptions - before
    return preemptions


@pytest.mark.parametrize("policy", ["harvest", "priority-recompute"])
def test_preempted_offline_output_is_identical(tiny_model, policy):
    prompts = make_prompts(make_engine(tiny_model), [21, 34])
    expected = reference(tiny_model, prompts)
    # 20 blocks of 4: each online request (60 + 4 tokens) needs 16 of them and evicts offline work
    engine = make_engine(tiny_model, policy=policy, num_blocks=20)
    ids = [engine.add_request(p, GREEDY) for p in prompts]
    assert preempt_repeatedly(engine, times=3) >= 3
    done = run_checked(engine)
    assert [done[i].token_ids for i in ids] == expected
    assert all(done[i].num_preemptions >= 1 for i in ids)


def test_checkpoints_bound_recompute_to_one_block(tiny_model):
    prompts = make_prompts(make_engine(tiny_model), [21, 34])
    recomputed = {}
    for policy in ("harvest", "priority-recompute"):
        engine = make_engine(tiny_model, policy=policy, num_blocks=20)
        for p in prompts:
            engine.add_request(p, GREEDY)
        preempted = preempt_repeatedly(engine, times=3)
        run_checked(engine)
        recomputed[policy] = (engine.stats.recomputed_tokens, preempted, engine.stats.restored_tokens)
    tokens, preempted, restored = recomputed["harvest"]
    block = 4
    assert tokens <= preempted * (block - 1)  # at most the partial last block per eviction
    assert restored > 0
    base_tokens, base_preempted, base_restored = recomputed["priority-recompute"]
    assert base_restored == 0
    assert base_tokens >= base_preempted * 21  # the whole context, every time
    assert tokens * 5 < base_tokens


class FailingStore(HostCheckpointStore):
    """Refuses every put after the first `ok`, as a store whose backend went away would."""

    def __init__(self, ok: int) -> None:
        super().__init__()
        self.ok, self.puts = ok, 0

    def put(self, key, first_block, chunk) -> None:
        self.puts += 1
        if self.puts > self.ok:
            raise RuntimeError("checkpoint backend gone")
        super().put(key, first_block, chunk)


def test_a_failing_checkpoint_store_costs_recompute_not_the_engine(tiny_model, caplog):
    prompts = make_prompts(make_engine(tiny_model), [21, 34])
    expected = reference(tiny_model, prompts)
    store = FailingStore(ok=2)
    engine = make_engine(tiny_model, num_blocks=20, checkpoint_store=store)
    ids = [engine.add_request(p, GREEDY) for p in prompts]
    assert preempt_repeatedly(engine, times=3) >= 3
    done = run_checked(engine)
    assert [done[i].token_ids for i in ids] == expected
    assert store.puts > store.ok and "goes on without a checkpoint" in caplog.text
    assert engine.stats.recomputed_tokens >= 21  # a whole context at least once: no checkpoint held it
    assert len(store) == 0


def test_export_resume_across_engines_is_identical(tiny_model):
    prompts = make_prompts(make_engine(tiny_model), [13, 26, 40])
    expected = reference(tiny_model, prompts)
    store = HostCheckpointStore()
    first = make_engine(tiny_model, checkpoint_store=store)
    second = make_engine(tiny_model, checkpoint_store=store)
    ids = [first.add_request(p, GREEDY) for p in prompts]
    for _ in range(9):
        step_checked(first)
    states = [first.export(i) for i in ids]
    assert first.block_manager.num_free_blocks == first.block_manager.num_blocks
    assert not first.has_unfinished()
    assert all(s.checkpoint.tokens > 0 for s in states)
    for s in states:
        second.resume(s)
    done = run_checked(second)
    assert [done[i].token_ids for i in ids] == expected
    assert second.stats.restored_tokens == sum(s.checkpoint.tokens for s in states)
    assert second.stats.recomputed_tokens == 0
    assert len(store) == 0  # finished requests drop their checkpoints


def test_seeded_sampling_survives_export_resume(tiny_model):
    params = SamplingParams(max_tokens=16, temperature=0.9, seed=7, ignore_eos=True)
    prompt = make_prompts(make_engine(tiny_model), [15])
    expected = make_engine(tiny_model).generate(prompt, params)[0].token_ids
    store = HostCheckpointStore()
    first = make_engine(tiny_model, checkpoint_store=store)
    rid = first.add_request(prompt[0], params)
    for _ in range(6):
        first.step()
    second = make_engine(tiny_model, checkpoint_store=store)
    second.resume(first.export(rid))
    assert run_checked(second)[rid].token_ids == expected


def test_layer_abort_leaves_no_half_written_state(tiny_model):
    prompts = make_prompts(make_engine(tiny_model), [30, 45])
    expected = reference(tiny_model, prompts)
    engine = make_engine(tiny_model)
    ids = [engine.add_request(p, GREEDY) for p in prompts]
    step_checked(engine)
    step_checked(engine)
    before = {r.request_id: (r.num_computed_tokens, list(r.block_table), list(r.token_ids))
              for r in engine.scheduler.running}  # fmt: skip
    arrivals = []

    def arrive(module, args):  # an online request lands while layer 1 is about to run
        if not arrivals:
            arrivals.append(engine.add_request([5, 6, 7, 8], ONLINE, request_class="online"))

    hook = engine.runner.model.model.layers[1].register_forward_pre_hook(arrive)
    outs = step_checked(engine)
    hook.remove()
    assert outs == [] and engine.last_step.aborted and engine.stats.aborted_steps == 1
    after = {r.request_id: (r.num_computed_tokens, list(r.block_table), list(r.token_ids))
             for r in engine.scheduler.running}  # fmt: skip
    assert after == before
    assert arrivals[0] in {o.request_id for o in step_checked(engine)}  # served the very next step
    done = run_checked(engine)
    assert [done[i].token_ids for i in ids] == expected


def test_online_steps_are_not_aborted(tiny_model):
    engine = make_engine(tiny_model)
    engine.add_request([5, 6, 7, 8], ONLINE, request_class="online")
    engine.add_request(make_prompts(engine, [30])[0], GREEDY)

    def arrive(module, args) -> None:
        engine.add_request([9, 9], ONLINE, request_class="online")

    hook = engine.runner.model.model.layers[1].register_forward_pre_hook(arrive)
    step_checked(engine)
    hook.remove()
    assert not engine.last_step.aborted


@pytest.fixture(scope="module")
def profiled(tiny_model):
    engine = make_engine(tiny_model, profile_latency=True, block_size=16, max_num_seqs=16)
    return engine


@contextmanager
def slo_targets(engine, ttft_s: float | None = None, tpot_s: float | None = None):
    """Online targets for one test; the shared `profiled` engine gets its own back after."""
    slo = engine.scheduler.config.slo
    old = (slo.ttft_s, slo.tpot_s)
    slo.ttft_s, slo.tpot_s = ttft_s or slo.ttft_s, tpot_s or slo.tpot_s
    try:
        yield
    finally:
        slo.ttft_s, slo.tpot_s = old


def test_latency_model_is_fitted_and_monotone(profiled):
    from harvest.engine.latency_model import BatchShape

    model = profiled.latency
    assert model.fitted and all(w >= 0 for w in model.weights)
    small, big = BatchShape(), BatchShape()
    small.add(16, 0)
    big.add(256, 0)
    assert model.predict(big) > model.predict(small) > 0


def test_slo_limits_offline_only_while_online_runs(profiled):
    engine = profiled
    with slo_targets(engine, tpot_s=1e-9):  # nothing fits next to online work
        offline = [engine.add_request(p, GREEDY) for p in make_prompts(engine, [40, 50])]
        online = engine.add_request([5, 6, 7], ONLINE, request_class="online")
        outs = step_checked(engine)
        assert {o.request_id for o in outs} == {online}
        assert engine.last_step.offline_tokens == 0 and engine.last_step.latency_budget_s <= 1e-9
        while not any(o.request_id == online and o.finished for o in outs):
            assert engine.last_step.offline_tokens == 0
            outs = step_checked(engine)
        done = run_checked(engine)  # no online load left: offline runs at the full batch
        assert set(offline) <= set(done)
        assert engine.last_step.latency_budget_s is None


def test_generous_slo_lets_offline_share_the_step(profiled):
    engine = profiled
    # far above any step of a tiny model, however loaded the machine
    with slo_targets(engine, ttft_s=60.0, tpot_s=60.0):
        # prompts the shared engine has not seen: its prefix cache holds the earlier tests' ones
        offline = [engine.add_request(p, GREEDY) for p in make_prompts(engine, [40, 50], start=100)]
        online = engine.add_request([5, 6, 7], ONLINE, request_class="online")
        outs = step_checked(engine)
        assert online in {o.request_id for o in outs}
        assert engine.last_step.offline_tokens == 90
        # 0.8 x the 60 s TTFT target left to the waiting request (a little under 60 s)
        assert engine.last_step.latency_budget_s == pytest.approx(48.0 / engine.latency.margin(), rel=1e-3)
        done = run_checked(engine)
        assert set(offline) <= set(done)


def test_budget_shrinks_by_how_much_steps_overrun_the_model():
    from harvest.engine.latency_model import BatchShape, LatencyModel

    model = LatencyModel(refit_every=32)
    shapes = []
    for n in (1, 8, 32, 128):
        shape = BatchShape()
        shape.add(n, 0)
        shapes.append(shape)
    model.profile_samples = [(s.features(), 0.001 + 0.0001 * s.tokens) for s in shapes]
    model.fit()
    assert model.margin() == 1.0
    for i in range(64):  # the machine got busy: every step takes twice the prediction
        shape = shapes[i % 4]
        model.observe(shape, 2 * model.predict(shape))
    assert 1.3 < model.margin() <= 2.0  # the refits follow the slower steps part of the way
    for i in range(256):  # quiet again: steps run as predicted or faster, never below 1
        shape = shapes[i % 4]
        model.observe(shape, 0.5 * model.predict(shape))
    assert model.margin() == 1.0


@pytest.mark.parametrize("policy", ["fcfs", "priority-recompute", "harvest"])
def test_backlog_queued_at_once_completes_in_a_small_pool(tiny_model, policy):
    # equal arrival times once deadlocked eviction ("only later arrivals give way")
    engine = make_engine(tiny_model, policy=policy, num_blocks=24)
    for p in make_prompts(engine, [20] * 6):
        engine.add_request(p, GREEDY, arrival_time=0.0)
    done = run_checked(engine)
    assert len(done) == 6 and engine.stats.preemptions > 0


def test_ttft_deadline_shrinks_the_budget(profiled):
    engine = profiled
    with slo_targets(engine, ttft_s=0.5, tpot_s=60.0):
        engine.add_request(make_prompts(engine, [40])[0], GREEDY)
        # an online request that has already waited past its TTFT target: offline must not slow it further
        engine.add_request([5, 6, 7], ONLINE, request_class="online", arrival_time=time.monotonic() - 1.0)
        step_checked(engine)
        assert engine.last_step.latency_budget_s == 0.0 and engine.last_step.offline_tokens == 0
        run_checked(engine)


def test_tpot_deadline_shrinks_the_budget(profiled):
    engine = profiled
    with slo_targets(engine, ttft_s=60.0, tpot_s=60.0):
        online = engine.add_request([5, 6, 7], ONLINE, request_class="online")
        step_checked(engine)  # its first token
        req = engine.requests[online]
        # the first token came 10 minutes ago (other prefills stalled it): its mean TPOT is
        # past the 60 s target, so its next step may carry no offline work
        req.first_token_time -= 600
        engine.add_request(make_prompts(engine, [40])[0], GREEDY)
        step_checked(engine)
        assert engine.last_step.latency_budget_s == 0.0 and engine.last_step.offline_tokens == 0
        req.first_token_time += 600  # back on schedule: offline shares the step again
        step_checked(engine)
        assert engine.last_step.offline_tokens > 0
        run_checked(engine)
