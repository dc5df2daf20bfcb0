"""The simulated device: hashed tokens that survive preemption, checkpoints and resume; steps
that take what the profile says; the real scheduler deciding exactly as over the real model."""

from __future__ import annotations

import threading
import time

import pytest

from harvest.checkpoint.loader import CheckpointLoader
from harvest.checkpoint.store import HostCheckpointStore
from harvest.engine import SamplingParams
from harvest.engine.attention import LayerAbort
from harvest.engine.latency_model import profile
from harvest.engine.request import Request
from harvest.engine.sim_profile import PROFILES
from harvest.engine.sim_runner import SimulatedRunner
from tests.helpers import make_engine, make_prompts, run_checked
from tests.test_coserve import preempt_repeatedly

SIM = "sim:cpu-tiny"  # the fastest profile: ~1 ms steps
GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


def make_sim(model, **kwargs):
    kwargs.setdefault("device", SIM)
    return make_engine(model, **kwargs)


def reference(model, prompts, params=GREEDY):
    return [o.token_ids for o in make_sim(model).generate(prompts, params)]


def test_engine_picks_the_simulated_runner_and_rejects_unknown_profiles(tiny_model):
    engine = make_sim(tiny_model, device="sim:h100-8b")
    assert isinstance(engine.runner, SimulatedRunner)
    assert engine.runner.profile is PROFILES["h100-8b"]
    with pytest.raises(ValueError, match=r"unknown sim profile 'b200'.*cpu-tiny"):
        make_sim(tiny_model, device="sim:b200")


def test_the_simulated_device_needs_no_weights(tiny_model, tmp_path):
    """Config and tokenizer are all it reads: a model directory without weights (or a
    generation config) serves, with the eos ids transformers derives from the config."""
    import shutil

    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model / name, tmp_path / name)
    engine = make_sim(tmp_path)
    out = engine.generate(["no weights here"], GREEDY)[0]
    assert out.token_ids == reference(tiny_model, ["no weights here"])[0]
    assert engine.eos_token_ids == {0}


def test_same_prompt_same_tokens_in_any_engine_and_batch(tiny_model):
    engine = make_sim(tiny_model)
    prompts = make_prompts(engine, [5, 17, 40])
    together = [o.token_ids for o in engine.generate(prompts, GREEDY)]
    alone = [make_sim(tiny_model).generate([p], GREEDY)[0].token_ids for p in prompts]
    assert together == alone
    assert len({tuple(t) for t in together}) == 3  # the context decides: different prompts differ
    assert all(len(set(t)) > 10 for t in together)  # and tokens vary within a sequence
    # sampling parameters do not move the simulated token
    sampled = SamplingParams(max_tokens=24, temperature=1.0, top_p=0.9, ignore_eos=True)
    assert make_sim(tiny_model).generate(prompts[:1], sampled)[0].token_ids == together[0]


@pytest.mark.parametrize("policy", ["harvest", "priority-recompute"])
def test_preempted_output_matches_uninterrupted(tiny_model, policy):
    prompts = make_prompts(make_sim(tiny_model), [21, 34])
    expected = reference(tiny_model, prompts)
    engine = make_sim(tiny_model, policy=policy, num_blocks=20)
    ids = [engine.add_request(p, GREEDY) for p in prompts]
    assert preempt_repeatedly(engine, times=3) >= 3
    done = run_checked(engine)
    assert [done[i].token_ids for i in ids] == expected
    if policy == "harvest":
        assert engine.stats.restored_tokens > 0  # resumed from checkpoints, not recomputed


def test_export_resume_across_engines_matches_uninterrupted(tiny_model):
    prompts = make_prompts(make_sim(tiny_model), [13, 26, 40])
    expected = reference(tiny_model, prompts)
    store = HostCheckpointStore()
    first = make_sim(tiny_model, checkpoint_store=store)
    second = make_sim(tiny_model, checkpoint_store=store)
    ids = [first.add_request(p, GREEDY) for p in prompts]
    for _ in range(9):
        first.step()
    states = [first.export(i) for i in ids]
    assert all(s.checkpoint.tokens > 0 for s in states)
    for s in states:
        second.resume(s)
    done = run_checked(second)
    assert [done[i].token_ids for i in ids] == expected
    assert second.stats.recomputed_tokens == 0  # the restored blocks carried the context


def test_tokens_come_from_the_kv_pool_so_a_lost_restore_shows(tiny_model, monkeypatch):
    """A restore that claims success without copying leaves stale hashes in the fresh
    blocks: the continuation must differ, or the simulated KV would check nothing."""
    prompts = make_prompts(make_sim(tiny_model), [13, 26, 40])
    expected = reference(tiny_model, prompts)
    store = HostCheckpointStore()
    first = make_sim(tiny_model, checkpoint_store=store)
    ids = [first.add_request(p, GREEDY) for p in prompts]
    for _ in range(9):
        first.step()
    states = [first.export(i) for i in ids]
    monkeypatch.setattr(CheckpointLoader, "_copy", lambda self, *args: None)
    second = make_sim(tiny_model, checkpoint_store=store)
    for s in states:
        second.resume(s)
    done = run_checked(second)
    assert [done[i].token_ids for i in ids] != expected


def test_a_step_takes_what_the_profile_predicts(tiny_model):
    engine = make_sim(tiny_model, device="sim:h100-8b", block_size=16)
    runner = engine.runner
    samples = profile(runner.execute, engine.block_manager, 512, 64, engine.max_model_len)
    assert len(samples) > 15
    ratios = []
    for shape, seconds in samples:  # each the fastest of three runs
        predicted = runner.profile.predict(shape)
        assert 6e-3 < predicted < 0.05  # an 8B step on an H100: milliseconds, not the CPU's
        # never shorter; longer only by a sleep's overshoot and, rarely, a busy machine's lag
        assert predicted <= seconds < predicted * 1.5 + 0.02, (shape.features(), predicted, seconds)
        ratios.append(seconds / predicted)
    assert sorted(ratios)[len(ratios) // 2] < 1.1


def test_a_simulated_worker_costs_a_sliver_of_a_core(tiny_model):
    engine = make_sim(tiny_model, device="sim:h100-8b")
    prompts = make_prompts(engine, [20] * 32)
    wall, cpu = time.perf_counter(), time.process_time()
    engine.generate(prompts, GREEDY)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    assert wall > 24 * 6e-3  # 24 decode steps of a 6+ ms profile
    assert cpu < 0.5 * wall  # the rest of the time it sleeps, the GIL released


def test_layer_abort_stops_the_sleep_and_writes_nothing(tiny_model):
    engine = make_sim(tiny_model, device="sim:h100-8b", block_size=16)
    runner = engine.runner
    req = Request("r", list(range(1, 300)), GREEDY)
    engine.block_manager.allocate(req, req.num_tokens)
    checks = []

    def abort() -> bool:  # an online request arrives while the second layer runs
        checks.append(time.perf_counter())
        return len(checks) > 2

    before = runner.kv_cache.clone()
    start = time.perf_counter()
    with pytest.raises(LayerAbort):
        runner.execute([req], [299], abort)
    aborted = time.perf_counter() - start
    assert runner.kv_cache.equal(before)
    start = time.perf_counter()
    logits = runner.execute([req], [299])  # run again, uninterrupted: one sampled row
    whole = time.perf_counter() - start
    assert logits.shape == (1, runner.vocab_size) and not runner.kv_cache.equal(before)
    # a few polls into the step, not all of it (measured side by side: a loaded box slows both)
    assert aborted < 0.5 * whole, (aborted, whole)


def record_batches(engine) -> list[tuple]:
    batches: list[tuple] = []
    schedule, finish_loads = engine.scheduler.schedule, engine._finish_loads

    def settled_finish_loads():
        # a load started in one step is in by the next, on every run: the step takes in
        # finished loads before it schedules, so settle before that, not in schedule()
        engine.loader.settle()
        finish_loads()

    engine._finish_loads = settled_finish_loads

    def recording():
        batch = schedule()
        # (id, tokens this step, tokens it still had to compute) per row, and whether a
        # latency budget applied
        rows = tuple(
            (r.request_id, n, r.num_uncomputed_tokens) for r, n in zip(batch.requests, batch.num_new_tokens)
        )
        batches.append((rows, batch.latency_budget_s is not None))
        return batch

    engine.scheduler.schedule = recording
    return batches


def scheduled(model, device: str) -> tuple[list[tuple], int]:
    """The batches the harvest scheduler builds for an online request, an offline backlog
    beside it and three online bursts that evict the backlog, under one fixed latency model
    whose budget binds while online work runs."""
    # predictions of seconds (the tiny CPU's weights x 1000) against a 2 s TPOT target:
    # wall-clock deadlines never bind, the latency model's budget does (it cuts offline prefill
    # chunks short beside online work), the same in both runs (no refit)
    slo = {"ttft_s": 1e4, "tpot_s": 2.0}
    engine = make_engine(model, device=device, num_blocks=40, slo=slo)
    engine.latency.weights = [w * 1000 for w in PROFILES["cpu-tiny"].weights]
    engine.latency.refit_every = 10**9
    batches = record_batches(engine)
    online = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    engine.add_request(make_prompts(engine, [10])[0], online, request_class="online", request_id="online")
    engine.step()
    for i, p in enumerate(make_prompts(engine, [21, 34, 9, 15])):
        engine.add_request(p, GREEDY, request_id=f"off-{i}")
    preempt_repeatedly(engine, times=3)
    run_checked(engine)
    return batches, engine.stats.preemptions


def test_the_scheduler_decides_the_same_over_the_simulated_device(tiny_model):
    real, real_preemptions = scheduled(tiny_model, "cpu")
    sim, sim_preemptions = scheduled(tiny_model, SIM)
    assert sim == real
    assert sim_preemptions == real_preemptions >= 3
    # the budget bound: beside online work, offline prompts were cut short of what they needed
    cut = [(rid, n, left) for rows, budgeted in sim if budgeted for rid, n, left in rows
           if rid.startswith("off") and n < left]  # fmt: skip
    assert cut


def test_simulated_workers_drain_a_job_through_the_real_queue(queue_store, make_job, tiny_model):
    """Two simulated workers share a job whose first shard a crashed worker left half done:
    every result is the token stream an uninterrupted simulated run gives."""
    from harvest.queue import JobStatus, Progress, WorkerConfig, run_local
    from harvest.queue.outputs import iter_results

    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    prompts = [f"prompt number {i}" for i in range(12)]
    expected = [o.token_ids for o in make_sim(tiny_model).generate(prompts, params)]
    job_id = make_job(12, shard_size=4, max_tokens=16, sampling={"ignore_eos": True})
    (lease,) = queue_store.lease("crashed", visibility_s=0.05)
    assert (
        queue_store.save_progress(lease, {0: Progress(expected[0][:5]), 1: Progress(expected[1][:9])}) == "ok"
    )

    def completed() -> bool:
        queue_store.sweep()  # hands the crashed worker's expired lease back to the queue
        return queue_store.get_job(job_id).status is JobStatus.COMPLETED

    # one shard at a time each: the first worker cannot take the whole job before the second starts
    config = WorkerConfig(idle_poll_s=0.02, max_shards=1)
    workers: list = []
    threads = [
        threading.Thread(target=lambda: workers.append(run_local(queue_store, make_sim(tiny_model), config,
                                                                 stop=completed)))
        for _ in range(2)
    ]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert completed() and len(workers) == 2
    results = [r.result for r in iter_results(queue_store, job_id)]
    assert [r.token_ids for r in results] == expected
    assert [r.resumed_tokens for r in results[:2]] == [5, 9]
    assert all(w.stats.results_written > 0 for w in workers)  # both took part
