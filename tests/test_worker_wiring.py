"""The worker's wiring over a mock engine (tests/mock_engine.py): no model, no Ray cluster.

The offline side (OfflineWorker and ShardRun leasing from real Redis and writing results),
the HTTP app over the worker's backend, the controller's levers, and a dying engine
charging its shard: what a GPUWorker does around whatever engine it is handed. Last, over
a real engine loop: the worker's stats are the figures the loop published, not the engine's.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from fastapi.testclient import TestClient

from actors.gpu_worker import GPUWorker, WorkerBackend
from harvest.api import build_app
from harvest.protocol.engine_client import EngineClient, EngineLoopError
from harvest.protocol.sampling_params import SamplingParams
from harvest.protocol.types import FinishReason, RequestOutput
from harvest.queue import JobStatus, WorkerConfig
from tests.mock_engine import MockEngine, expected_tokens

MODEL = "mock"
FAST = WorkerConfig(idle_poll_s=0.02, progress_interval_s=0.02, result_flush_s=0.01)


def wait_for(predicate: Callable[[], object], timeout: float = 30.0) -> object:
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)
    return value


@pytest.fixture
def started(redis_server) -> Iterator[list[MockEngine | GPUWorker]]:
    """Engines and workers put here are stopped after the test (before its Redis is),
    whatever happened."""
    made: list[MockEngine | GPUWorker] = []
    yield made
    for thing in reversed(made):
        thing.shutdown() if isinstance(thing, GPUWorker) else thing.stop()


def make_worker(store, started: list[MockEngine | GPUWorker], **mock_options) -> GPUWorker:
    engine = MockEngine(**mock_options)
    worker = GPUWorker("worker-under-test", engine, store, FAST, labels={"node_id": "here"})
    started += [engine, worker]
    return worker


def test_the_mock_is_an_engine_client_that_fails_alone_or_dies(started):
    engine = MockEngine(fail_if=lambda rid: rid == "bad", token_delay_s=0.01)
    started.append(engine)
    assert isinstance(engine, EngineClient)
    outputs: dict[str, list[RequestOutput]] = {"good": [], "bad": [], "long": []}
    errors: list[BaseException] = []
    for rid in ("good", "bad"):
        engine.submit("w1 w2", SamplingParams(max_tokens=4), rid, on_output=outputs[rid].append)
    wait_for(lambda: outputs["good"] and outputs["good"][-1].finished)
    ids = engine.tokenizer.encode("w1 w2")
    assert outputs["good"][-1].token_ids == expected_tokens(ids, 4)
    assert outputs["good"][-1].finish_reason is FinishReason.LENGTH
    assert [o.finish_reason for o in outputs["bad"]] == [FinishReason.ERROR]
    assert engine.healthy()

    engine.submit("w3", SamplingParams(max_tokens=200), "long", on_output=outputs["long"].append,
                  on_error=errors.append)  # fmt: skip
    wait_for(lambda: outputs["long"])
    engine.die()
    wait_for(lambda: not engine.running)
    assert isinstance(engine.error, RuntimeError) and not engine.healthy()
    assert len(errors) == 1 and isinstance(errors[0], EngineLoopError)
    with pytest.raises(EngineLoopError):
        engine.submit("w1", SamplingParams(max_tokens=1))


def test_an_offline_job_runs_through_the_worker(queue_client, started):
    worker = make_worker(queue_client.store, started, fail_if=lambda rid: "/1/0@" in rid)
    prompts = [f"w{i} w{i + 1} w{i + 2}" for i in range(5)]
    job = queue_client.submit(prompts, max_tokens=6, temperature=0, shard_size=2, model=MODEL)
    job = queue_client.wait(job.id, timeout=30, progress=False)
    assert job.status is JobStatus.COMPLETED
    assert (job.request_counts.completed, job.request_counts.failed) == (4, 1)
    rows = queue_client.results(job.id).to_pylist()
    tok = worker.loop.tokenizer
    assert [r["custom_id"] for r in rows] == [f"request-{i}" for i in range(5)]  # one record each
    for i, row in enumerate(rows):
        if i == 2:  # shard 1, index 0: the engine failed it alone
            assert row["status"] == "failed" and row["error_code"] == "engine_error"
            continue
        expected = expected_tokens(tok.encode(prompts[i]), 6)
        assert row["output_token_ids"] == expected and row["output"] == tok.decode(expected)
        assert row["worker"] == "worker-under-test"
    stats = worker.stats()
    assert stats["node_id"] == "here" and stats["worker_id"] == "worker-under-test"
    assert stats["shards"] == [] and stats["offline_inflight"] == 0 and stats["loop_steps"] >= 6
    assert stats["finished"] == {"length": 4, "error": 1}


def test_the_controllers_levers_reach_the_engine(queue_store, started):
    worker = make_worker(queue_store, started)
    worker.apply({"offline": False, "slo": [0.5, 0.05]})
    assert worker.offline.leasing is False and worker.slo_target == (0.5, 0.05)
    wait_for(lambda: worker.loop.slo == (0.5, 0.05))  # through the engine's inbox
    with pytest.raises(ValueError):
        worker.set_slo(-1.0, 0.05)
    assert worker.stats()["slo"] == {"ttft_s": 0.5, "tpot_s": 0.05}


def test_http_streams_from_the_worker_backend(queue_store, started):
    worker = make_worker(queue_store, started, token_delay_s=0.001)
    app = build_app(WorkerBackend(worker, [MODEL, "alias"]))
    body = {"model": "alias", "prompt": "w7 w8", "max_tokens": 5, "stream": True}
    with TestClient(app) as client:
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [x.removeprefix("data: ") for x in r.text.splitlines() if x.startswith("data: ")]
        assert lines[-1] == "[DONE]"
        chunks = [json.loads(x) for x in lines[:-1]]
        assert client.get("/health").status_code == 200
    tok = worker.loop.tokenizer
    assert "".join(c["choices"][0]["text"] for c in chunks) == tok.decode(
        expected_tokens(tok.encode("w7 w8"), 5)
    )
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert len(worker.feedback.ttft) == 1  # the handler's latencies went to the SLO feedback
    assert worker.loop.num_pending() == 0


@pytest.mark.parametrize("end", ["engine died", "graceful stop"])
def test_a_dying_engine_charges_the_shard_a_stop_does_not(queue_client, started, end):
    worker = make_worker(queue_client.store, started, token_delay_s=0.02)
    job = queue_client.submit(["w1 w2", "w3 w4"], max_tokens=200, temperature=0, shard_size=2, model=MODEL)
    wait_for(lambda: worker.offline.inflight_requests == 2)  # both admitted and in the engine
    if end == "engine died":
        worker.loop.die()
        wait_for(lambda: not worker.loop.running)
        assert not worker.health()
    worker.shutdown()  # after a death, release_all(crashed=True): the shard spends its attempt
    (lease,) = queue_client.store.lease("next-worker", visibility_s=5)
    assert lease.job_id == job.id
    if end == "engine died":
        assert lease.attempt == 2 and lease.crashes == {0: 1, 1: 1}  # both were in the engine
    else:
        assert lease.attempt == 1 and lease.crashes == {}  # given back: nothing spent or charged


def test_worker_stats_are_the_figures_the_loop_published(tiny_model, queue_store, loops, started):
    # the one test here with a model: the real EngineLoop's figures, as the worker reports them
    from harvest.serving import EngineLoop
    from tests.helpers import make_engine
    from tests.test_engine_loop import StepGate

    engine = make_engine(tiny_model, num_blocks=40)
    loop = EngineLoop(engine)
    loops.append(loop)
    worker = GPUWorker("worker-under-test", loop, queue_store, FAST)
    started.append(worker)
    gate = StepGate(engine)
    done = threading.Event()
    try:
        params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
        loop.submit("a b c d e f g h", params, on_output=lambda out: out.finished and done.set())
        assert gate.entered.wait(30)  # the loop thread is parked in its first step's forward
        assert engine.block_manager.num_used_blocks > 0  # the step has taken its blocks ...
        stats = worker.stats()  # ... but the report is the loop's, as of its last finished step
        assert stats["kv_blocks_used"] == 0 and stats["loop_steps"] == 0 and stats["totals"]["steps"] == 0
    finally:
        gate.remove()
    assert done.wait(30)
    stats = worker.stats()
    assert stats["kv_blocks_total"] == 40 and stats["totals"]["generated_offline"] == 3
    assert stats["last_step"]["kv_blocks_total"] == 40 and stats["loop_steps"] >= 3
