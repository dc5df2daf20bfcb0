"""Faults cost what caused them: a Redis outage or a read-only Redis pauses offline work and
costs no attempt; a request that crashes its worker twice is quarantined, alone."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import redis

from harvest.engine import Engine
from harvest.local_redis import free_port
from harvest.queue import JobStatus, JobStore, OfflineWorker, WorkerConfig, run_local
from harvest.queue.outputs import iter_results
from harvest.queue.pause import Pause
from harvest.serving import EngineLoop
from tests.test_queue_store import fake_results
from tests.test_queue_worker import batch_line, reference, terminal, wait_for


class WatchedWorker:
    """run_local in a thread over an OfflineWorker the test can watch while it runs."""

    def __init__(self, url: str, engine: Engine, config: WorkerConfig) -> None:
        self.stop = threading.Event()
        started = threading.Event()

        def watch(worker: OfflineWorker) -> None:
            self.worker = worker
            started.set()

        self.thread = threading.Thread(
            target=run_local,
            args=(JobStore.from_url(url), engine, config),
            kwargs={"stop": self.stop.is_set, "on_start": watch},
            daemon=True,
        )
        self.thread.start()
        assert started.wait(30)

    def join(self) -> None:
        self.stop.set()
        self.thread.join(timeout=30)
        assert not self.thread.is_alive()


def reachable(predicate):
    """`predicate`, or False while Redis does not answer (the test polls through an outage)."""

    def check():
        try:
            return predicate()
        except redis.ConnectionError:
            return False

    return check


def lines(lengths: list[int]) -> list[dict]:
    return [batch_line(f"r{i}", f"prompt {i}", n) for i, n in enumerate(lengths)]


def attempts(store: JobStore, job_id: str) -> list[str]:
    return [store.shard_info(job_id, n)["attempts"] for n in range(store.get_job(job_id).num_shards)]


def test_redis_down_longer_than_the_visibility_timeout_costs_no_attempt(
    redis_server, queue_client, queue_engine, caplog
):
    store = queue_client.store
    lengths = [3, 120, 120, 120] * 2
    job = queue_client.submit(lines(lengths), shard_size=4)
    config = WorkerConfig(visibility_timeout_s=2, progress_interval_s=0.1, idle_poll_s=0.05)
    watched = WatchedWorker(redis_server.url, queue_engine, config)
    try:
        wait_for(
            lambda: store.get_job(job.id).leased == 2 and store.get_job(job.id).request_counts.completed >= 1
        )
        redis_server.stop()
        paused = wait_for(lambda: watched.worker.paused)
        assert paused.startswith("Redis unreachable since ") and "ConnectionError" in paused
        time.sleep(2 * config.visibility_timeout_s)  # the outage itself: every lease's deadline passes
        assert watched.worker.status()["io_thread_alive"] and watched.thread.is_alive()  # sync never raised
        redis_server.start()
        done = wait_for(reachable(lambda: terminal(store, job.id)), poll_s=0.05)
        # the job may finish without this worker (its last results were in before the outage,
        # the test's sweep finalizes it) while its pause waits out a backoff: wait for that
        wait_for(lambda: watched.worker.paused is None)
        assert watched.worker.status()["io_thread_alive"]
    finally:
        watched.join()
    assert done.status is JobStatus.COMPLETED and done.request_counts.completed == 8
    rows = list(iter_results(store, job.id))
    assert len({r.custom_id for r in rows}) == len(rows) == 8  # exactly once
    assert [len(r.result.token_ids) for r in rows] == lengths
    assert attempts(store, job.id) == ["1", "1"]  # the outage charged nothing
    assert all(r.result.attempt == 1 for r in rows)
    logged = [r.getMessage() for r in caplog.records if r.name == "harvest.queue.worker"]
    assert sum("offline work paused" in m for m in logged) == 1  # once, not at every retry
    assert sum("Redis is back" in m for m in logged) == 1


def test_read_only_redis_pauses_offline_work_and_it_resumes(redis_server, queue_client, queue_engine):
    store = queue_client.store
    lengths = [2, 60, 60, 60] * 2
    job = queue_client.submit(lines(lengths), shard_size=4)
    config = WorkerConfig(visibility_timeout_s=10, progress_interval_s=0.05, idle_poll_s=0.05)
    watched = WatchedWorker(redis_server.url, queue_engine, config)
    try:
        wait_for(lambda: store.get_job(job.id).request_counts.completed >= 1)
        # a real failover's symptom: the server turns replica (of a master that is not there),
        # keeps its data and answers every write with READONLY
        store.r.execute_command("REPLICAOF", "127.0.0.1", free_port())
        paused = wait_for(lambda: watched.worker.paused)
        assert paused.startswith("Redis failing since ") and "ReadOnlyError" in paused
        stalled = store.get_job(job.id).request_counts.completed
        wait_for(lambda: not queue_engine.has_unfinished())  # the engine finishes what it holds...
        assert store.get_job(job.id).request_counts.completed == stalled  # ...and nothing is written
        assert watched.worker.paused is not None and watched.worker.status()["io_thread_alive"]
        assert watched.thread.is_alive()  # the engine loop never saw an error
        store.r.execute_command("REPLICAOF", "NO", "ONE")
        done = wait_for(lambda: terminal(store, job.id), poll_s=0.05)
        assert watched.worker.paused is None
    finally:
        watched.join()
    assert done.status is JobStatus.COMPLETED and done.request_counts.completed == 8
    rows = list(iter_results(store, job.id))
    assert len(rows) == 8 and [len(r.result.token_ids) for r in rows] == lengths
    assert attempts(store, job.id) == ["1", "1"]


def test_a_lease_that_expired_while_the_queue_was_silent_gets_one_more_timeout(queue_store, make_job):
    job_id = make_job(4, shard_size=4)
    (held,) = queue_store.lease("w", visibility_s=0.4)
    time.sleep(0.6)  # nobody reaches the queue (the outage): the lease's deadline passes unseen
    assert queue_store.lease("other", 5) == []  # not reclaimed: extended by one timeout instead
    assert queue_store.renew(held, 0.4) == "ok"  # so its holder, back, keeps it
    assert queue_store.shard_info(job_id, 0)["attempts"] == "1"
    # the holder dies now: with the queue busy (polled), its lease is reclaimed and charged as usual
    taken = wait_for(lambda: queue_store.lease("other", 0.4))[0]
    assert taken.attempt == 2 and "lease expired" in queue_store.shard_info(job_id, 0)["last_error"]
    # a holder that died before a silence gets the grace once, and is charged one timeout later
    time.sleep(0.6)
    assert queue_store.lease("third", 5) == []
    again = wait_for(lambda: queue_store.lease("third", 5))[0]
    assert again.attempt == 3


def test_quarantine_in_the_store(queue_store, make_job):
    job_id = make_job(4, shard_size=4)
    (first,) = queue_store.lease("w1", visibility_s=0.05)
    assert queue_store.write_results(first, fake_results(first, [0])) == ["ok"]
    assert queue_store.admit(first, [0, 1, 2, 3]) == "ok"
    second = wait_for(lambda: queue_store.lease("w2", visibility_s=0.05))[0]  # first expired: a crash
    assert second.crashes == {1: 1, 2: 1, 3: 1}  # 0 had finished: not charged
    assert queue_store.admit(second, [2]) == "ok"  # a worker admits suspects one at a time
    third = wait_for(lambda: queue_store.lease("w3", visibility_s=5))[0]
    assert third.done == {0, 2} and third.crashes == {1: 1, 3: 1}
    assert queue_store.admit(third, [1, 3]) == "ok"
    assert queue_store.release(third) == "requeued"  # graceful: charges nothing
    fourth = queue_store.lease("w4", visibility_s=5)[0]
    assert fourth.crashes == {1: 1, 3: 1} and fourth.attempt == 3
    assert queue_store.write_results(fourth, fake_results(fourth, [1, 3])) == ["ok", "ok"]
    assert queue_store.ack(fourth) == "ok"
    job = queue_store.get_job(job_id)
    assert job.status is JobStatus.COMPLETED
    assert (job.request_counts.completed, job.request_counts.failed) == (3, 1)
    rows = {r.custom_id: r.result for r in iter_results(queue_store, job_id)}
    assert rows["request-2"].error_code == "engine_crash"
    assert "crashed the engine twice" in rows["request-2"].error_message
    assert all(rows[f"request-{i}"].ok for i in (0, 1, 3))


def test_a_dead_engine_is_a_crash_and_a_graceful_stop_is_not(queue_store, queue_engine, make_job):
    job_id = make_job(2, shard_size=2, max_tokens=200, sampling={"ignore_eos": True})
    config = WorkerConfig(idle_poll_s=0.02)
    for crashed, expected in ((False, {}), (True, {0: 1, 1: 1})):
        loop = EngineLoop(queue_engine)
        worker = OfflineWorker(queue_store, loop, config, background=False)
        generating = threading.Event()
        loop.on_step = lambda outputs, generating=generating: outputs and generating.set()
        worker.tick()  # leases the shard and admits its requests
        assert worker.inflight_requests == 2
        assert generating.wait(30)  # the engine runs them
        loop.stop()
        worker.release_all(crashed=crashed)
        (lease,) = queue_store.lease("check", visibility_s=5)
        assert lease.crashes == expected
        assert lease.attempt == (2 if crashed else 1)  # a graceful stop gave its attempt back
        assert queue_store.release(lease) == "requeued"
    for _ in range(3):
        queue_engine.step()  # the aborts take effect
    assert not queue_engine.has_unfinished()
    assert queue_store.get_job(job_id).request_counts.failed == 0


POISONED_WORKER = """
import os, sys
from harvest.engine import Engine
from harvest.queue import JobStore, WorkerConfig, run_local

url, model, poison = sys.argv[1:]
engine = Engine.from_pretrained(model, max_num_seqs=8, profile_latency=False)
step = engine.step

def step_or_die():  # the fault: this request kills the process whenever it is in a step
    if any(rid.split("@")[0] == poison for rid in engine.requests):
        os._exit(1)
    return step()

engine.step = step_or_die
run_local(JobStore.from_url(url), engine, WorkerConfig(visibility_timeout_s=1, idle_poll_s=0.05))
"""


def test_a_request_that_kills_its_worker_twice_is_quarantined_alone(
    redis_server, queue_client, queue_engine, tiny_model
):
    store = queue_client.store
    lines = [batch_line(f"r{i}", f"prompt {i}", 6) for i in range(6)]
    job = queue_client.submit(lines, shard_size=6)
    poison = f"{job.id}/0/2"
    deaths = []
    for _ in range(2):
        victim = subprocess.run(
            [sys.executable, "-c", POISONED_WORKER, redis_server.url, str(tiny_model), poison],
            capture_output=True, timeout=240,
        )  # fmt: skip
        assert victim.returncode == 1, victim.stderr.decode()[-2000:]
        deaths.append(store.get_job(job.id).request_counts)
    # the first death charged the whole admitted shard; the second worker ran those suspects
    # one at a time, finished r0 and r1, and died with r2 alone in the engine
    assert (deaths[1].completed, deaths[1].failed) == (2, 0)
    run_local(store, queue_engine, WorkerConfig(visibility_timeout_s=1, idle_poll_s=0.02),
              stop=lambda: terminal(store, job.id))  # fmt: skip
    done = store.get_job(job.id)
    assert done.status is JobStatus.COMPLETED
    assert (done.request_counts.completed, done.request_counts.failed) == (5, 1)
    rows = {r.custom_id: r.result for r in iter_results(store, job.id)}
    assert rows["r2"].error_code == "engine_crash" and "twice" in rows["r2"].error_message
    good = [f"r{i}" for i in (0, 1, 3, 4, 5)]
    expected = reference(queue_engine, [f"prompt {i}" for i in (0, 1, 3, 4, 5)], 6)
    assert [rows[c].token_ids for c in good] == expected


def test_pause_backs_off_to_its_cap_and_notes_a_new_cause():
    pause = Pause.start(redis.ConnectionError("refused"))
    assert pause.unreachable and pause.describe().startswith("Redis unreachable since ")
    assert not any(pause.failed_again(redis.ConnectionError("refused"), cap_s=0.5) for _ in range(4))
    assert pause.backoff_s == 0.5  # 0.1, 0.2, 0.4, then the cap
    assert pause.failed_again(redis.ReadOnlyError("You can't write against a read only replica"), cap_s=0.5)
    assert not pause.unreachable and "failing since" in pause.describe() and "ReadOnlyError" in pause.cause
