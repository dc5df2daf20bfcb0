"""The job store against a real redis-server: life cycle, leases, fencing, dead letters, races."""

from __future__ import annotations

import threading
import time

import pytest

from harvest.checkpoint import CheckpointHandle
from harvest.queue import JobNotFoundError, JobStatus, Progress, Result, ShardState
from harvest.queue.outputs import iter_results

# a checkpoint in a node keeper, as a worker reports it: it goes through Redis as a dict
HANDLE = CheckpointHandle("harvest-ckpt-node0", "job/0/0@1", 32)


def fake_results(lease, indices=None) -> dict[int, Result]:
    """What a worker would write: the custom_id as text, tagged with the lease token."""
    indices = range(len(lease.requests)) if indices is None else indices
    return {i: Result("completed", text=f"{lease.requests[i]['custom_id']}@{lease.token}") for i in indices}


def run_fake(store, worker: str, visibility_s: float = 5.0) -> int:
    """Drain the queue with instant fake results; returns shards acked."""
    acked = 0
    while leases := store.lease(worker, visibility_s):
        for lease in leases:
            assert store.write_results(lease, fake_results(lease)) != "lost"
            assert store.ack(lease) == "ok"
            acked += 1
    return acked


def wait_for(predicate, timeout: float = 10.0, poll_s: float = 0.02):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(poll_s)
    return value


def test_life_cycle_counts_and_statuses(queue_store, make_job):
    job_id = make_job(10, shard_size=4)
    job = queue_store.get_job(job_id)
    assert job.status is JobStatus.IN_PROGRESS
    assert (job.request_counts.total, job.num_shards) == (10, 3)
    assert run_fake(queue_store, "w1") == 3
    job = queue_store.get_job(job_id)
    assert job.status is JobStatus.COMPLETED
    assert (job.request_counts.completed, job.request_counts.failed, job.leased) == (10, 0, 0)
    assert job.created_at <= job.in_progress_at <= job.finalizing_at <= job.completed_at
    rows = list(iter_results(queue_store, job_id))
    assert [r.custom_id for r in rows] == [f"request-{i}" for i in range(10)]
    assert all(r.result.text.startswith(r.custom_id + "@") for r in rows)


def test_round_robin_across_jobs(queue_store, make_job):
    first, second = make_job(8, shard_size=2), make_job(8, shard_size=2)
    leased = [lease.job_id for lease in queue_store.lease("w", 5, max_shards=4)]
    assert leased == [first, second, first, second]


def test_ack_refuses_incomplete_shard(queue_store, make_job):
    make_job(4, shard_size=4)
    (lease,) = queue_store.lease("w", 5)
    assert queue_store.write_results(lease, fake_results(lease, [0, 1])) == ["ok", "ok"]
    assert queue_store.ack(lease) == "incomplete"
    assert queue_store.write_results(lease, fake_results(lease, [1, 2, 3])) == ["dup", "ok", "ok"]
    assert queue_store.ack(lease) == "ok"


def test_expired_lease_is_taken_over_and_stale_writer_fenced(queue_store, make_job):
    job_id = make_job(4, shard_size=4)
    (stale,) = queue_store.lease("slow", visibility_s=0.2)
    assert queue_store.write_results(stale, fake_results(stale, [0])) == ["ok"]
    fresh = wait_for(lambda: queue_store.lease("fast", visibility_s=5))[0]
    assert (fresh.shard, fresh.attempt) == (stale.shard, 2) and fresh.token > stale.token
    assert fresh.done == {0}  # the finished request is not run again
    # the stale worker wakes up: every write it tries is refused
    assert queue_store.write_results(stale, fake_results(stale, [1, 2, 3])) == "lost"
    assert queue_store.save_progress(stale, {1: Progress([1, 2, 3])}) == "lost"
    assert queue_store.renew(stale, 5) == "lost"
    assert queue_store.ack(stale) == "lost"
    assert queue_store.write_results(fresh, fake_results(fresh, [1, 2, 3])) == ["ok"] * 3
    assert queue_store.ack(fresh) == "ok"
    texts = [r.result.text for r in iter_results(queue_store, job_id)]
    assert texts == [f"request-0@{stale.token}"] + [f"request-{i}@{fresh.token}" for i in (1, 2, 3)]
    assert queue_store.get_job(job_id).request_counts.completed == 4


def test_renew_keeps_lease_alive(queue_store, make_job):
    make_job(2, shard_size=2)
    (lease,) = queue_store.lease("w", visibility_s=0.3)
    for _ in range(4):
        time.sleep(0.1)  # the lease would have expired after 0.3 s without these renewals
        assert queue_store.renew(lease, 0.3) == "ok"
    assert queue_store.sweep() == 0
    assert queue_store.shard_info(lease.job_id, 0)["state"] == ShardState.LEASED.value


def test_progress_round_trip_and_cleared_by_result(queue_store, make_job):
    job_id = make_job(2, shard_size=2)
    (lease,) = queue_store.lease("w", visibility_s=0.2)
    assert queue_store.save_progress(lease, {0: Progress([5, 6, 7], HANDLE), 1: Progress([9])}) == "ok"
    assert queue_store.get_progress(job_id, 0) == {0: Progress([5, 6, 7], HANDLE), 1: Progress([9])}
    queue_store.write_results(lease, fake_results(lease, [1]))
    assert set(queue_store.get_progress(job_id, 0)) == {0}
    # a worker that takes over gets the progress with its lease
    again = wait_for(lambda: queue_store.lease("w2", visibility_s=5))[0]
    assert again.progress == {0: Progress([5, 6, 7], HANDLE)} and again.done == {1}


def test_dead_letter_after_max_attempts(queue_store, make_job):
    job_id = make_job(6, shard_size=3, max_attempts=2)
    first = queue_store.lease("w", 5, max_shards=1)[0]
    assert queue_store.write_results(first, fake_results(first, [0])) == ["ok"]
    assert queue_store.fail(first, "CUDA error: boom") == "requeued"
    second = queue_store.lease("w", 5)[0]
    assert (second.shard, second.attempt) == (first.shard, 2)
    assert queue_store.fail(second, "CUDA error: boom again") == "dead"
    assert queue_store.dead_letters() == [(job_id, first.shard, "CUDA error: boom again")]
    run_fake(queue_store, "w")  # the other shard succeeds
    job = queue_store.get_job(job_id)
    assert job.status is JobStatus.COMPLETED
    assert (job.request_counts.completed, job.request_counts.failed) == (4, 2)
    rows = {r.custom_id: r.result for r in iter_results(queue_store, job_id)}
    assert len(rows) == 6 and rows["request-0"].ok  # the result written before the failures stays
    assert rows["request-1"].error_code == "shard_failed" and "boom again" in rows["request-1"].error_message


def test_expired_leases_count_as_attempts(queue_store, make_job):
    job_id = make_job(2, shard_size=2, max_attempts=2)
    for _ in range(2):
        wait_for(lambda: queue_store.lease("crashy", visibility_s=0.05))  # leased, never renewed
    wait_for(lambda: queue_store.sweep() or queue_store.get_job(job_id).status.is_terminal)
    job = wait_for(lambda: (j := queue_store.get_job(job_id)).status.is_terminal and j)
    assert job.status is JobStatus.COMPLETED and job.request_counts.failed == 2
    assert "lease expired" in queue_store.dead_letters()[0][2]


def test_release_gives_shard_back_without_spending_an_attempt(queue_store, make_job):
    make_job(2, shard_size=2, max_attempts=1)
    (lease,) = queue_store.lease("w", 5)
    assert queue_store.release(lease) == "requeued"
    (again,) = queue_store.lease("w", 5)
    assert again.attempt == 1 and again.shard == lease.shard


def test_cancel_keeps_finished_results(queue_store, make_job):
    job_id = make_job(8, shard_size=4)
    (lease,) = queue_store.lease("w", 5)
    assert queue_store.write_results(lease, fake_results(lease, [0, 1])) == ["ok", "ok"]
    assert queue_store.cancel(job_id) is JobStatus.CANCELLING  # a shard is still leased
    assert queue_store.lease("w", 5) == []  # nothing more is handed out
    assert queue_store.write_results(lease, fake_results(lease, [2])) == ["ok"]  # in flight: kept
    assert queue_store.renew(lease, 5) == "closed"
    assert queue_store.release(lease) == "closed"
    job = queue_store.get_job(job_id)
    assert job.status is JobStatus.CANCELLED and job.request_counts.completed == 3
    assert queue_store.write_results(lease, fake_results(lease, [3])) == "lost"
    rows = list(iter_results(queue_store, job_id))
    assert [r.result.ok for r in rows] == [True] * 3 + [False] * 5
    assert {r.result.error_code for r in rows[3:]} == {"batch_cancelled"}
    assert queue_store.cancel(job_id) is JobStatus.CANCELLED  # idempotent


def test_expiry_keeps_finished_results(queue_store, make_job):
    job_id = make_job(4, shard_size=2, completion_window_s=0.3)
    (lease,) = queue_store.lease("w", 5)
    queue_store.write_results(lease, fake_results(lease))
    assert queue_store.ack(lease) == "ok"
    (late,) = queue_store.lease("w", 5)
    job = wait_for(
        lambda: queue_store.sweep() >= 0 and (j := queue_store.get_job(job_id)).status.is_terminal and j
    )
    assert job.status is JobStatus.EXPIRED and job.request_counts.completed == 2
    assert queue_store.write_results(late, fake_results(late)) == "closed"
    assert queue_store.renew(late, 5) == "closed"
    rows = list(iter_results(queue_store, job_id))
    assert [r.result.error_code for r in rows] == [None, None, "batch_expired", "batch_expired"]


def test_racing_workers_no_duplicates_no_losses(queue_store, make_job):
    job_id = make_job(300, shard_size=3)
    acked: dict[str, int] = {}
    errors: list[BaseException] = []

    def worker(name: str) -> None:
        try:
            acked[name] = run_fake(queue_store, name)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sum(acked.values()) == 100  # every shard acked once, by exactly one worker
    job = queue_store.get_job(job_id)
    assert job.status is JobStatus.COMPLETED and job.request_counts.completed == 300
    rows = list(iter_results(queue_store, job_id))
    assert len({r.custom_id for r in rows}) == len(rows) == 300
    assert all(queue_store.shard_info(job_id, n)["attempts"] == "1" for n in range(100))


def test_cancel_before_any_lease_and_unknown_job(queue_store, make_job):
    job_id = make_job(4)
    assert queue_store.cancel(job_id) is JobStatus.CANCELLED
    assert queue_store.lease("w", 5) == []
    with pytest.raises(JobNotFoundError):
        queue_store.cancel("batch_nope")


def test_delete_finished_job(queue_store, make_job):
    job_id = make_job(4, shard_size=2, max_attempts=1)
    with pytest.raises(ValueError, match="cancel it first"):
        queue_store.delete_job(job_id)
    (lease,) = queue_store.lease("w", 5)
    queue_store.fail(lease, "boom")
    run_fake(queue_store, "w")
    queue_store.delete_job(job_id)
    with pytest.raises(JobNotFoundError):
        queue_store.get_job(job_id)
    assert queue_store.dead_letters() == [] and queue_store.r.keys(f"harvest:job:{job_id}*") == []


SLOW_SUBMITTER = """
import sys, time
from harvest.queue import JobOptions, JobStore
from harvest.queue.inputs import read_items
from harvest.queue.submit import submit

store = JobStore.from_url(sys.argv[1], submitter_timeout_s=1.0)

def source():
    for item in read_items([f"prompt {i}" for i in range(100_000)], {}):
        time.sleep(0.01)  # a slow input: validation takes minutes
        yield item

submit(store, source, JobOptions())
"""


def test_submitter_killed_mid_validation_fails_its_job(redis_server, queue_store):
    import signal
    import subprocess
    import sys

    submitter = subprocess.Popen([sys.executable, "-c", SLOW_SUBMITTER, redis_server.url])
    try:
        job = wait_for(lambda: queue_store.list_jobs())[0]
        assert job.status is JobStatus.VALIDATING
        time.sleep(2.0)  # past the timeout: its heartbeats keep it validating
        queue_store.sweep()
        assert queue_store.get_job(job.id).status is JobStatus.VALIDATING
        submitter.send_signal(signal.SIGKILL)
        submitter.wait(timeout=10)
    finally:
        submitter.kill()
    time.sleep(1.2)
    queue_store.sweep()
    failed = queue_store.get_job(job.id)
    assert failed.status is JobStatus.FAILED and failed.num_errors == 1
    assert "submission abandoned" in failed.errors[0]["message"]
    assert queue_store.lease("w", 5) == []
    queue_store.delete_job(job.id)  # terminal: its partial shards can go
