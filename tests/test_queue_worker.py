"""The local worker on the tiny model: life cycle, resume, kill -9 mid-shard, Redis restart."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import pyarrow.parquet as pq
import pytest

from harvest.engine import Engine, SamplingParams
from harvest.queue import JobStatus, JobStore, Progress, WorkerConfig, run_local
from harvest.queue.outputs import iter_results


def batch_line(custom_id: str, prompt: str, max_tokens: int, **body) -> dict:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, **body}
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/completions", "body": body}


def wait_for(predicate, timeout: float = 60.0, poll_s: float = 0.01):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(poll_s)
    return value


def reference(engine: Engine, prompts: list[str], max_tokens: int) -> list[list[int]]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    return [out.token_ids for out in engine.generate(prompts, params)]


class WorkerThread:
    """run_local in a thread until stopped; re-raises the loop's exception on join."""

    def __init__(self, url: str, engine: Engine, config: WorkerConfig) -> None:
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.worker = None

        def target() -> None:
            try:
                self.worker = run_local(JobStore.from_url(url), engine, config, stop=self.stop.is_set)
            except BaseException as exc:
                self.error = exc

        self.thread = threading.Thread(target=target, daemon=True)
        self.thread.start()

    def join(self) -> None:
        self.stop.set()
        self.thread.join(timeout=30)
        assert not self.thread.is_alive()
        if self.error is not None:
            raise self.error


def terminal(store: JobStore, job_id: str):
    store.sweep()
    job = store.get_job(job_id)
    return job if job.status.is_terminal else None


def test_full_life_cycle_through_the_engine(queue_client, queue_engine, tmp_path):
    prompts = ["The miller", "Once upon a time", "To make bread"]
    chat = [{"role": "user", "content": "Hello there"}]
    requests = [
        *prompts,
        chat,
        batch_line("long", "word " * 1500, 4),  # longer than the model's context: fails alone
        batch_line("stopped", prompts[0], 12, stop=["\n"]),
    ]
    job = queue_client.submit(requests, max_tokens=6, temperature=0, shard_size=2, model="tiny")
    assert job.status is JobStatus.IN_PROGRESS and job.num_shards == 3
    worker = run_local(queue_client.store, queue_engine, WorkerConfig(), exit_when_idle=True)
    assert worker.stats.results_written == 6
    job = queue_client.wait(job.id, timeout=5, progress=False)
    assert job.status is JobStatus.COMPLETED
    assert (job.request_counts.completed, job.request_counts.failed) == (5, 1)

    expected = [o.text for o in queue_engine.generate(prompts, SamplingParams(max_tokens=6, temperature=0))]
    chat_ids = queue_engine.tokenizer.encode(
        queue_engine.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False),
        add_special_tokens=False,
    )
    expected.append(queue_engine.generate([chat_ids], SamplingParams(max_tokens=6, temperature=0))[0].text)
    table = queue_client.results(job.id)
    rows = table.to_pylist()
    assert [r["custom_id"] for r in rows] == [
        "request-0",
        "request-1",
        "request-2",
        "request-3",
        "long",
        "stopped",
    ]
    assert [r["output"] for r in rows[:4]] == expected
    assert all(r["completion_tokens"] == len(r["output_token_ids"]) for r in rows)
    assert rows[4]["status"] == "failed" and rows[4]["error_code"] == "invalid_request"
    # engine time per result; the request refused before the engine took none
    assert all(r["device_seconds"] > 0 for r in rows[:4]) and rows[4]["device_seconds"] == 0
    assert "\n" not in rows[5]["output"]

    queue_client.export(job.id, tmp_path / "out.parquet")
    assert pq.read_table(tmp_path / "out.parquet").num_rows == 6
    queue_client.export(job.id, tmp_path / "out.jsonl")
    lines = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [x["custom_id"] for x in lines] == ["request-0", "request-1", "request-2", "request-3", "stopped"]
    assert lines[0]["response"]["body"]["choices"][0]["text"] == expected[0]
    assert lines[3]["response"]["body"]["choices"][0]["message"]["content"] == expected[3]
    assert lines[0]["response"]["body"]["model"] == "tiny"
    (error,) = [json.loads(x) for x in (tmp_path / "out.errors.jsonl").read_text().splitlines()]
    assert error["custom_id"] == "long" and error["error"]["code"] == "invalid_request"


def test_resumed_request_continues_where_it_stopped(queue_store, queue_engine, make_job):
    job_id = make_job(2, shard_size=2, max_tokens=24)
    full = reference(queue_engine, ["prompt number 0", "prompt number 1"], 24)
    (lease,) = queue_store.lease("crashed", visibility_s=0.05)
    assert queue_store.save_progress(lease, {0: Progress(full[0][:10]), 1: Progress(full[1][:24])}) == "ok"
    run_local(
        queue_store, queue_engine, WorkerConfig(idle_poll_s=0.02), stop=lambda: terminal(queue_store, job_id)
    )
    results = [r.result for r in iter_results(queue_store, job_id)]
    assert [r.token_ids for r in results] == full
    assert [r.resumed_tokens for r in results] == [10, 24]  # 24: finished before the crash, nothing rerun
    assert results[0].text == queue_engine.tokenizer.decode(full[0], skip_special_tokens=True)


def test_resumed_request_adopts_the_checkpoint_its_progress_names(queue_store, tiny_model, make_job):
    """An earlier attempt left a KV checkpoint and recorded its handle with its progress; the
    next attempt (a new request id, another engine sharing the store) adopts it and computes
    only what the checkpoint does not hold."""
    from harvest.checkpoint.store import HostCheckpointStore

    store = HostCheckpointStore()
    earlier = Engine.from_pretrained(
        str(tiny_model), block_size=4, profile_latency=False, checkpoint_store=store
    )
    job_id = make_job(1, shard_size=1, max_tokens=24)
    (full,) = reference(earlier, ["prompt number 0"], 24)
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    earlier.add_request("prompt number 0", params, request_id="earlier")
    for _ in range(10):
        earlier.step()
    state = earlier.export("earlier")
    done = state.token_ids[state.num_prompt_tokens :]
    assert state.checkpoint.key == "earlier" and state.checkpoint.tokens >= 8 and len(done) == 10
    (lease,) = queue_store.lease("crashed", visibility_s=0.05)
    assert queue_store.save_progress(lease, {0: Progress(done, state.checkpoint)}) == "ok"
    engine = Engine.from_pretrained(
        str(tiny_model), block_size=4, profile_latency=False, checkpoint_store=store
    )
    run_local(queue_store, engine, WorkerConfig(idle_poll_s=0.02), stop=lambda: terminal(queue_store, job_id))
    (result,) = [r.result for r in iter_results(queue_store, job_id)]
    assert result.token_ids == full and result.resumed_tokens == 10
    assert engine.stats.restored_tokens == state.checkpoint.tokens and engine.stats.recomputed_tokens == 0
    assert len(store) == 0  # adopted under the new id, dropped when it finished


def test_seeded_sampled_request_resumes_as_if_uninterrupted(queue_store, queue_engine, make_job):
    sampling = {"temperature": 1.0, "top_p": 0.9, "seed": 11, "ignore_eos": True}
    job_id = make_job(2, shard_size=2, max_tokens=24, sampling=sampling)
    params = SamplingParams(max_tokens=24, **sampling)
    full = [o.token_ids for o in queue_engine.generate(["prompt number 0", "prompt number 1"], params)]
    (lease,) = queue_store.lease("crashed", visibility_s=0.05)
    assert queue_store.save_progress(lease, {0: Progress(full[0][:10]), 1: Progress(full[1][:3])}) == "ok"
    run_local(
        queue_store, queue_engine, WorkerConfig(idle_poll_s=0.02), stop=lambda: terminal(queue_store, job_id)
    )
    results = [r.result for r in iter_results(queue_store, job_id)]
    assert [r.resumed_tokens for r in results] == [10, 3]
    assert [r.token_ids for r in results] == full  # the new worker draws the same tokens


def test_worker_killed_mid_shard(redis_server, queue_client, queue_engine, tiny_model):
    store = queue_client.store
    # per shard: two short requests finish (and are written) early, four long ones are mid-way at the kill
    lengths = [2, 2, 80, 80, 80, 80] * 2
    lines = [batch_line(f"r{i}", f"prompt {i}", n) for i, n in enumerate(lengths)]
    job = queue_client.submit(lines, shard_size=6)
    victim = subprocess.Popen(
        [sys.executable, "-m", "harvest.queue", "--redis-url", redis_server.url, "--model", str(tiny_model),
         "--visibility-timeout", "2", "--progress-interval", "0.05", "--max-num-seqs", "4"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:

        def mid_shard() -> bool:
            assert victim.poll() is None, victim.stderr.read().decode()[-2000:]
            done = len(store.shard_results(job.id, 0))
            progress = store.get_progress(job.id, 0)
            return done == 2 and any(len(p.token_ids) >= 10 for p in progress.values())

        wait_for(mid_shard)
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=10)
    finally:
        victim.kill()
        victim.stderr.close()
    saved = store.get_progress(job.id, 0)
    assert store.get_job(job.id).request_counts.completed == 2

    run_local(store, queue_engine, WorkerConfig(visibility_timeout_s=2), stop=lambda: terminal(store, job.id))
    job = store.get_job(job.id)
    assert job.status is JobStatus.COMPLETED and job.request_counts.completed == 12
    rows = list(iter_results(store, job.id))
    assert sorted(r.custom_id for r in rows) == sorted(f"r{i}" for i in range(12))  # exactly one each
    by_id = {r.custom_id: r.result for r in rows}
    assert all(f":{victim.pid}:" in by_id[f"r{i}"].worker for i in (0, 1))  # kept, not rerun
    resumed = [by_id[f"r{i}"] for i in saved]
    assert resumed and all(r.attempt == 2 and r.resumed_tokens > 0 for r in resumed)
    long_ids = [i for i, n in enumerate(lengths) if n == 80]
    expected = reference(queue_engine, [f"prompt {i}" for i in long_ids], 80)
    assert [by_id[f"r{i}"].token_ids for i in long_ids] == expected


def test_redis_restart_mid_job(redis_server, queue_client, queue_engine):
    lengths = [3, 300, 300, 300] * 3
    job = queue_client.submit(
        [batch_line(f"r{i}", f"prompt {i}", n) for i, n in enumerate(lengths)], shard_size=4
    )
    config = WorkerConfig(visibility_timeout_s=10, progress_interval_s=0.1, idle_poll_s=0.05)
    worker = WorkerThread(redis_server.url, queue_engine, config)
    try:
        wait_for(lambda: queue_client.store.get_job(job.id).request_counts.completed >= 1)
        assert queue_client.store.get_job(job.id).status is JobStatus.IN_PROGRESS
        run_id = queue_client.store.r.info("server")["run_id"]
        redis_server.restart()
        assert queue_client.store.r.info("server")["run_id"] != run_id  # a new server, state from AOF
        done = wait_for(lambda: terminal(queue_client.store, job.id), poll_s=0.05)
    finally:
        worker.join()
    assert done.status is JobStatus.COMPLETED and done.request_counts.completed == 12
    rows = list(iter_results(queue_client.store, job.id))
    assert len({r.custom_id for r in rows}) == len(rows) == 12
    assert [len(r.result.token_ids) for r in rows] == lengths


def test_two_workers_share_a_job_without_duplicates(redis_server, queue_client, queue_engine, tiny_model):
    job = queue_client.submit([f"prompt {i}" for i in range(16)], max_tokens=8, temperature=0, shard_size=2)
    config = WorkerConfig(max_shards=2, max_inflight_requests=4, idle_poll_s=0.02)
    second_engine = Engine.from_pretrained(str(tiny_model), max_num_seqs=8, profile_latency=False)
    workers = [WorkerThread(redis_server.url, e, config) for e in (queue_engine, second_engine)]
    try:
        done = wait_for(lambda: terminal(queue_client.store, job.id), poll_s=0.05)
    finally:
        for w in workers:
            w.join()
    assert done.request_counts.completed == 16
    rows = list(iter_results(queue_client.store, job.id))
    assert len({r.custom_id for r in rows}) == 16
    assert all(r.result.attempt == 1 for r in rows)  # no shard was handed out twice
    assert sum(w.worker.stats.results_written for w in workers) == 16
    assert all(w.worker.stats.results_written > 0 for w in workers)


@pytest.mark.parametrize("how", ["cancel", "expire"])
def test_worker_stops_on_cancel_or_expiry_keeping_results(redis_server, queue_client, queue_engine, how):
    lengths = [2, 900, 900]
    lines = [batch_line(f"r{i}", f"prompt {i}", n) for i, n in enumerate(lengths)]
    job = queue_client.submit(lines, shard_size=3, completion_window="1h")
    config = WorkerConfig(visibility_timeout_s=0.6, idle_poll_s=0.02)
    worker = WorkerThread(redis_server.url, queue_engine, config)
    try:
        wait_for(lambda: queue_client.store.get_job(job.id).request_counts.completed == 1)
        if how == "cancel":
            assert queue_client.cancel(job.id).status is JobStatus.CANCELLING
        else:  # the completion window runs out now (the real clock is tested in test_queue_store)
            queue_client.store.r.zadd("harvest:deadlines", {job.id: 0})
        done = wait_for(lambda: terminal(queue_client.store, job.id), timeout=20)
    finally:
        worker.join()
    assert done.status is (JobStatus.CANCELLED if how == "cancel" else JobStatus.EXPIRED)
    for _ in range(3):  # aborts take effect at the next step; unaborted requests would need ~900
        queue_engine.step()
    assert not queue_engine.has_unfinished()
    rows = [r.result for r in iter_results(queue_client.store, job.id)]
    assert rows[0].ok and len(rows[0].token_ids) == 2
    assert [r.error_code for r in rows[1:]] == [f"batch_{done.status.value}"] * 2
