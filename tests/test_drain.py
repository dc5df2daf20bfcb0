"""Drain on one node, without Ray: the worker over a mock engine (tests/mock_engine.py) and real
Redis, the controller's drain order, and the engine loop's export over a real tiny engine.

The two-node drain (checkpoints shipped to the other node's keeper, the drained node's
requests resumed there) runs in tests/test_multinode.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from actors.gpu_worker import GPUWorker, WorkerBackend
from controller.controller import HarvestController
from harvest.checkpoint.handle import CheckpointHandle
from harvest.engine import SamplingParams
from harvest.queue import JobStatus, WorkerConfig
from harvest.serving import EngineLoop
from tests.helpers import make_engine
from tests.mock_engine import MockEngine, expected_tokens
from tests.test_worker_wiring import wait_for

MODEL = "mock"
FAST = WorkerConfig(idle_poll_s=0.02, progress_interval_s=0.02, result_flush_s=0.01)


@pytest.fixture
def workers(redis_server) -> Iterator[list[GPUWorker]]:
    """Workers put here (and their engines) are stopped after the test, before its Redis."""
    made: list[GPUWorker] = []
    yield made
    for worker in reversed(made):
        worker.shutdown()


def make_worker(store, workers: list[GPUWorker], name: str, **options) -> GPUWorker:
    worker = GPUWorker(name, MockEngine(token_delay_s=0.01), store, FAST, **options)
    workers.append(worker)
    return worker


def survivor(handle: CheckpointHandle, node_id: str) -> CheckpointHandle:
    """A stand-in for RayCheckpointStore.send: the checkpoint now lives in `node_id`'s keeper."""
    return CheckpointHandle(f"keeper-{node_id}", handle.key, handle.tokens)


def test_a_drained_workers_shards_go_back_uncharged_and_resume_elsewhere(queue_client, workers):
    draining = make_worker(queue_client.store, workers, "draining", ship=survivor)
    prompts = ["w1 w2 w3", "w4 w5"]
    job = queue_client.submit(prompts, max_tokens=200, temperature=0, shard_size=2, model=MODEL)
    wait_for(lambda: draining.offline.inflight_requests == 2)
    # each request has made a full block (16 tokens) so its export names a checkpoint
    run = draining.offline.shards[f"{job.id}/0"]
    wait_for(lambda: min(len(r.output_ids) for r in list(run.running.values())) > 20)
    draining.drain("test", keeper_node="node-b")
    state = wait_for(lambda: draining.drain_state["state"] == "drained" and draining.drain_state)
    given = state["offline"]
    assert (given["shards"], given["requests"]) == (1, 2) and given["generated_tokens"] > 40
    assert given["checkpointed_tokens"] >= 32
    assert not draining.health() and draining.stats()["draining"]["state"] == "drained"
    draining.apply({"offline": True})  # the controller cannot switch a drained worker back on
    assert draining.offline.leasing is False and draining.stats()["shards"] == []

    (lease,) = queue_client.store.lease("peek", visibility_s=5)  # what the next holder gets
    assert lease.attempt == 1 and lease.crashes == {}  # given back: no attempt spent, no crash
    assert [lease.progress[i].checkpoint.store for i in (0, 1)] == ["keeper-node-b"] * 2
    assert all(len(p.token_ids) > 20 for p in lease.progress.values())
    queue_client.store.release(lease)

    make_worker(queue_client.store, workers, "taker")
    done = queue_client.wait(job.id, timeout=60, progress=False)
    assert done.status is JobStatus.COMPLETED and done.request_counts.completed == 2
    tok = draining.loop.tokenizer
    for prompt, row in zip(prompts, queue_client.results(job.id).to_pylist(), strict=True):
        assert row["worker"] == "taker" and row["resumed_tokens"] > 20
        assert row["output_token_ids"] == expected_tokens(tok.encode(prompt), 200)  # exactly as uninterrupted


def test_a_draining_worker_leaves_rotation_and_serves_what_still_reaches_it(queue_store, workers):
    worker = make_worker(queue_store, workers, "draining")
    backend = WorkerBackend(worker, MODEL)
    ids = worker.loop.tokenizer.encode("w1 w2")
    params = SamplingParams(max_tokens=40)

    async def scenario() -> tuple[list, list]:
        stream = backend.generate(ids, params, "in-flight")
        outputs = [await anext(stream)]
        worker.drain("test")
        assert not worker.health()  # Serve's replica fails HAProxy's checks from its next check on
        late = [out async for out in backend.generate(ids, params, "late")]  # until then: served
        return outputs + [out async for out in stream], late

    outputs, late = asyncio.run(scenario())
    assert outputs[-1].token_ids == late[-1].token_ids == expected_tokens(ids, 40)
    state = wait_for(lambda: worker.drain_state["state"] == "drained" and worker.drain_state)
    assert state["online_inflight"] >= 1  # the hand-back found the HTTP request in flight


def test_a_termination_notice_file_starts_the_drain(queue_store, workers, tmp_path):
    notice = tmp_path / "terminate"
    worker = make_worker(queue_store, workers, "spot", termination_notice=str(notice))
    assert not worker.check_termination_notice() and worker.drain_state is None
    notice.touch()
    assert worker.check_termination_notice()
    state = wait_for(lambda: worker.drain_state)
    assert str(notice) in state["reason"] and state["keeper_node"] is None  # no controller to ask
    wait_for(lambda: worker.drain_state["state"] == "drained")


def test_the_controller_drains_a_worker_or_a_node_once_and_names_a_node_that_stays(redis_server):
    controller = HarvestController({"redis_url": redis_server.url, "monitor_period_s": 60, "num_workers": 3})
    try:
        for name, node in (("w1", "aaaa1111"), ("w2", "aaaa1111"), ("w3", "bbbb2222")):
            assert controller.heartbeat(name, {"node_id": node}, None)["drain"] is None
        answer = controller.drain("aaaa")  # a node, by a prefix of its id: both its workers
        assert sorted(answer["workers"]) == ["w1", "w2"]
        keeper_node = answer["order"]["keeper_node"]
        assert keeper_node not in (None, "aaaa1111")  # checkpoints go to a node that stays
        assert controller.heartbeat("w1", {"node_id": "aaaa1111"}, None)["drain"] == answer["order"]
        assert controller.heartbeat("w3", {"node_id": "bbbb2222"}, None)["drain"] is None
        assert controller.drain("w1")["order"] == answer["order"]  # idempotent: the same order
        with pytest.raises(ValueError, match="no worker or node 'nope'"):
            controller.drain("nope")
        controller.leave("w1")  # gone: its order goes with it
        assert "w1" not in controller.drains and "w2" in controller.drains
    finally:
        controller.shutdown()


def test_the_engine_loop_exports_a_running_request_with_its_checkpoint(tiny_model, loops):
    engine = make_engine(tiny_model, max_num_seqs=4)
    loop = EngineLoop(engine)
    loops.append(loop)
    prompt = engine.tokenizer.encode("The miller listened to the water wheel")
    params = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)
    # another engine sharing the store, with no prefix cache to serve the blocks instead
    other = make_engine(tiny_model, max_num_seqs=4, checkpoint_store=engine.checkpoint_store,
                        enable_prefix_caching=False)  # fmt: skip
    (expected,) = other.generate([prompt], params)
    seen = []
    loop.submit(prompt, params, "r1", on_output=seen.append)
    wait_for(lambda: len(seen) >= 16)
    (state,) = loop.export(["r1", "finished-or-unknown"])
    assert state.request_id == "r1" and len(state.token_ids) > len(prompt) + 15
    assert state.checkpoint is not None and state.checkpoint.tokens >= 16  # full blocks of 4 saved
    assert engine.checkpoint_store.num_blocks("r1") * 4 >= state.checkpoint.tokens
    count = len(seen)
    assert loop.num_pending() == 0 and not seen[-1].finished
    loops.append(other_loop := EngineLoop(other))
    resumed = []
    other_loop.resume(state, on_output=resumed.append)
    wait_for(lambda: resumed and resumed[-1].finished)
    assert len(seen) == count  # the exported request's sink heard nothing more
    assert resumed[-1].token_ids == expected.token_ids
    assert other.stats.restored_tokens >= 16  # from the checkpoint the export saved
