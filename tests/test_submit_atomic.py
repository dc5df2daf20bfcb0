"""Submissions leave nothing half-made: every failure ends with nothing in Redis, or with the
job `failed` (its errors recorded) and no shard of it left; a job cancelled meanwhile is
never reported as queued."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Callable

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import redis
from typer.testing import CliRunner

from harvest.cli import app
from harvest.cli.exits import EXIT_BAD_INPUT, EXIT_NOT_COMPLETED
from harvest.queue import InvalidInputError, JobNotQueuedError, JobOptions, JobStatus, JobStore
from harvest.queue.inputs import read_items
from harvest.queue.submit import submit
from tests.test_queue_store import wait_for

N_PROMPTS = 100
FAULT_AT = 40  # with one request per shard, two writes of 16 shards are in Redis by then
SHARDS_BEFORE_FAULT = 32


def prompt_source(on_item: Callable[[int, int], None] | None = None):
    """N_PROMPTS prompts, read in two passes; `on_item(pass, index)` runs before each item:
    the seam where a test injects its fault."""
    passes = 0

    def source():
        nonlocal passes
        passes += 1
        for i, item in enumerate(read_items([f"prompt {i}" for i in range(N_PROMPTS)], {})):
            if on_item is not None:
                on_item(passes, i)
            yield item

    source.passes = lambda: passes
    return source


def one_per_shard() -> JobOptions:
    return JobOptions(shard_size=1, defaults={"max_tokens": 2})


def job_keys(store: JobStore, job_id: str) -> list[str]:
    return sorted(store.r.scan_iter(f"{store.prefix}:job:{job_id}*"))


def num_shard_hashes(store: JobStore, job_id: str) -> int:
    return sum(1 for _ in store.r.scan_iter(f"{store.prefix}:job:{job_id}:shard:*"))


def only_job(store: JobStore) -> str:
    (job,) = store.list_jobs()
    return job.id


def assert_failed_and_empty(store: JobStore, job_id: str, status: JobStatus = JobStatus.FAILED) -> None:
    """The job record alone is left: no shard, payload or ready list, nothing leasable."""
    job = store.get_job(job_id)
    assert job.status is status
    assert job_keys(store, job_id) == [store.job_key(job_id)]
    assert job.num_shards == 0 and job.request_counts.total == 0
    assert store.r.zscore(f"{store.prefix}:validating", job_id) is None
    assert store.lease("w", 5) == []


def write_table(path) -> None:
    if path.suffix == ".parquet":
        pq.write_table(pa.table({"text": ["alpha", "beta"]}), path)
    else:
        path.write_text("text\nalpha\nbeta\n")


WHOLE_INPUT_ERRORS = [
    ("docs.csv", {"column": "body"}, "no column(s) ['body'] in docs.csv"),
    ("docs.parquet", {"column": "body"}, "no column(s) ['body'] in docs.parquet"),
    ("docs.csv", {"column": "text", "id_column": "key"}, "no column(s) ['key']"),
    ("docs.csv", {"template": "Q: {text} {topic}"}, "no column(s) ['topic']"),
    ("docs.csv", {"template": "Q: {text:d}"}, "{text} takes no format spec"),
    ("docs.csv", {"template": "Q: {text!r}"}, "{text} takes no format spec or conversion"),
    ("docs.csv", {"template": "Q: {}"}, "must name a column"),
    ("docs.csv", {"template": "Q: {0}"}, "must name a column"),
    ("docs.csv", {"template": "Q: {text"}, "bad prompt template"),
    ("docs.txt", {"column": "text"}, "unknown table type '.txt'"),
    ("missing.csv", {"column": "text"}, "no such file"),
]


@pytest.mark.parametrize(("name", "kwargs", "words"), WHOLE_INPUT_ERRORS)
def test_whole_input_errors_are_judged_before_a_job_exists(queue_client, tmp_path, name, kwargs, words):
    if name != "missing.csv":
        write_table(tmp_path / name)
    with pytest.raises(InvalidInputError) as info:
        queue_client.submit_file(tmp_path / name, **kwargs)
    assert words in str(info.value)
    assert info.value.job_id is None and queue_client.store.r.dbsize() == 0  # nothing at all


def test_a_bad_csv_row_is_not_judged_up_front_but_still_leaves_no_shards(queue_client, tmp_path):
    """Only the header is read before the job exists: a row further down is that row's error."""
    rows = "".join(f"doc {i}\n" for i in range(50))
    (tmp_path / "docs.csv").write_text(f"text\n{rows}a,b,c\n")
    with pytest.raises(ValueError):  # the row's InvalidInputError, or pyarrow's parse error
        queue_client.submit_file(tmp_path / "docs.csv", column="text", shard_size=1)
    assert_failed_and_empty(queue_client.store, only_job(queue_client.store))


def test_a_restarted_redis_without_its_scripts_still_gets_whole_jobs(queue_store, redis_server):
    """Creating a job is one script (record + submitter deadline): a pipeline that met an empty
    script cache after a Redis restart used to leave a record with no deadline, never swept."""
    redis_server.restart()  # the same data back from its AOF, but no scripts
    job_id = submit(queue_store, prompt_source(), one_per_shard())
    job = queue_store.get_job(job_id)
    assert job.status is JobStatus.IN_PROGRESS and job.request_counts.total == N_PROMPTS
    assert job.created_at is not None


def test_bad_lines_fail_the_job_with_no_shards(queue_client):
    with pytest.raises(InvalidInputError) as info:
        queue_client.submit(["fine", 42, "also fine"])
    assert [e.line for e in info.value.errors] == [2]
    assert_failed_and_empty(queue_client.store, info.value.job_id)
    assert queue_client.store.get_job(info.value.job_id).num_errors == 1


def test_an_input_error_found_while_writing_drops_the_written_shards(queue_store):
    from harvest.queue.inputs import InputError

    def fault(passes: int, i: int) -> None:
        if passes == 2 and i == FAULT_AT:
            assert num_shard_hashes(queue_store, only_job(queue_store)) == SHARDS_BEFORE_FAULT
            raise InvalidInputError([InputError(0, "the file changed under us")])

    with pytest.raises(InvalidInputError) as info:
        submit(queue_store, prompt_source(fault), one_per_shard())
    assert_failed_and_empty(queue_store, info.value.job_id)
    assert queue_store.get_job(info.value.job_id).errors[0]["message"] == "the file changed under us"


def test_an_interrupt_mid_write_fails_the_job_and_drops_its_shards(queue_store):
    def fault(passes: int, i: int) -> None:
        if passes == 2 and i == FAULT_AT:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        submit(queue_store, prompt_source(fault), one_per_shard())
    job_id = only_job(queue_store)
    assert_failed_and_empty(queue_store, job_id)
    assert "submission interrupted: KeyboardInterrupt()" in queue_store.get_job(job_id).errors[0]["message"]


def test_redis_dying_mid_write_leaves_a_job_that_the_sweep_fails_and_empties(redis_server, caplog):
    store = JobStore.from_url(redis_server.url, submitter_timeout_s=0.5)

    def fault(passes: int, i: int) -> None:
        if passes == 2 and i == FAULT_AT:
            redis_server.stop()

    with pytest.raises(redis.ConnectionError):
        submit(store, prompt_source(fault), one_per_shard())
    assert "a sweep will fail it and drop its shards" in caplog.text
    redis_server.start()  # from its append-only file: the half-written job is back
    job_id = only_job(store)
    assert store.get_job(job_id).status is JobStatus.VALIDATING
    assert num_shard_hashes(store, job_id) == SHARDS_BEFORE_FAULT
    assert store.lease("w", 5) == []  # never leasable, even half-written
    wait_for(lambda: store.sweep() >= 0 and store.get_job(job_id).status is JobStatus.FAILED)
    assert_failed_and_empty(store, job_id)
    assert "submission abandoned" in store.get_job(job_id).errors[0]["message"]


def test_a_job_cancelled_before_activation_is_not_reported_queued(queue_store, monkeypatch):
    def cancel_first(job_id: str) -> JobStatus:
        queue_store.cancel(job_id)
        return JobStore.activate(queue_store, job_id)

    monkeypatch.setattr(queue_store, "activate", cancel_first)
    with pytest.raises(JobNotQueuedError, match="cancelled during submission") as info:
        submit(queue_store, prompt_source(), one_per_shard())
    assert info.value.status == "cancelled"
    assert_failed_and_empty(queue_store, info.value.job_id, JobStatus.CANCELLED)
    assert queue_store.r.zrange(f"{queue_store.prefix}:classes", 0, -1) == []


def test_a_job_cancelled_mid_write_gets_no_more_shards(queue_store):
    def cancel(passes: int, i: int) -> None:
        if passes == 2 and i == FAULT_AT:
            assert queue_store.cancel(only_job(queue_store)) is JobStatus.CANCELLED

    with pytest.raises(JobNotQueuedError) as info:
        submit(queue_store, prompt_source(cancel), one_per_shard())
    assert_failed_and_empty(queue_store, info.value.job_id, JobStatus.CANCELLED)


def test_a_job_cancelled_mid_validation_stops_its_submitter_at_the_next_heartbeat(redis_server):
    store = JobStore.from_url(redis_server.url, submitter_timeout_s=0.0)  # a heartbeat every item

    def cancel(passes: int, i: int) -> None:
        if passes == 1 and i == 5:
            store.cancel(only_job(store))

    source = prompt_source(cancel)
    with pytest.raises(JobNotQueuedError, match="cancelled"):
        submit(store, source, one_per_shard())
    assert source.passes() == 1  # it stopped validating; no shard was ever written
    assert_failed_and_empty(store, only_job(store), JobStatus.CANCELLED)


def test_a_stalled_submitter_failed_by_the_sweep_writes_nothing_more(redis_server):
    store = JobStore.from_url(redis_server.url, submitter_timeout_s=0.2)

    def stall(passes: int, i: int) -> None:
        if passes == 2 and i == FAULT_AT:  # silent past its deadline: taken for dead
            job_id = only_job(store)
            wait_for(lambda: store.sweep() >= 0 and store.get_job(job_id).status is JobStatus.FAILED)

    with pytest.raises(JobNotQueuedError, match="submission abandoned"):
        submit(store, prompt_source(stall), one_per_shard())
    assert_failed_and_empty(store, only_job(store))


KILLED_SUBMITTER = """
import sys, time
from harvest.queue import JobOptions, JobStore
from harvest.queue.inputs import read_items
from harvest.queue.submit import submit

store = JobStore.from_url(sys.argv[1], submitter_timeout_s=1.0)
passes = 0

def source():
    global passes
    passes += 1
    for i, item in enumerate(read_items([f"prompt {i}" for i in range(100)], {})):
        if passes == 2 and i == 40:
            print("stalled", flush=True)
            time.sleep(600)
        yield item

submit(store, source, JobOptions(shard_size=1))
"""


def test_a_submitter_killed_mid_write_is_failed_by_the_sweep_and_its_shards_dropped(
    redis_server, queue_store
):
    submitter = subprocess.Popen(
        [sys.executable, "-c", KILLED_SUBMITTER, redis_server.url], stdout=subprocess.PIPE, text=True
    )
    try:
        assert submitter.stdout.readline().strip() == "stalled"
        job_id = only_job(queue_store)
        assert num_shard_hashes(queue_store, job_id) == SHARDS_BEFORE_FAULT
        submitter.send_signal(signal.SIGKILL)
        submitter.wait(timeout=10)
    finally:
        submitter.kill()
        submitter.stdout.close()
    wait_for(lambda: queue_store.sweep() >= 0 and queue_store.get_job(job_id).status is JobStatus.FAILED)
    assert_failed_and_empty(queue_store, job_id)


# ---------------------------------------------------------------------- the CLI


@pytest.fixture
def cli(redis_server):
    runner = CliRunner()
    return lambda *args: runner.invoke(app, [*args, "--redis-url", redis_server.url])


@pytest.mark.parametrize(
    ("name", "args", "words"),
    [
        ("docs.csv", ["--column", "body"], "no column(s) ['body']"),
        ("docs.csv", ["--template", "Q: {text:d}"], "{text} takes no format spec"),
        ("docs.txt", ["--column", "text"], "unknown table type '.txt'"),
    ],
)
def test_cli_whole_input_errors_name_the_problem_and_create_nothing(
    cli, queue_store, tmp_path, name, args, words
):
    write_table(tmp_path / name)
    result = cli("submit", str(tmp_path / name), *args)
    assert result.exit_code == EXIT_BAD_INPUT
    assert words in " ".join(result.stderr.split())  # as one line: the console wraps it
    assert "Traceback" not in result.output
    assert result.stdout == "" and queue_store.r.dbsize() == 0


def test_cli_bad_line_names_it_and_leaves_a_failed_job_without_shards(cli, queue_store, tmp_path):
    path = tmp_path / "in.jsonl"
    good = {"custom_id": "a", "url": "/v1/completions", "body": {"prompt": "p", "max_tokens": 2}}
    bad = {"custom_id": "b", "url": "/v1/completions", "body": {"prompt": "p", "top_p": 0}}
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    result = cli("submit", str(path))
    assert result.exit_code == EXIT_BAD_INPUT and "line 2: Invalid value for 'top_p'" in result.stderr
    assert "recorded as failed" in result.stderr and result.stdout == ""
    assert_failed_and_empty(queue_store, only_job(queue_store))


def test_cli_says_when_the_job_was_cancelled_during_submission(cli, queue_store, tmp_path, monkeypatch):
    def cancel_first(self: JobStore, job_id: str) -> JobStatus:
        self.cancel(job_id)
        return activate(self, job_id)

    activate = JobStore.activate
    monkeypatch.setattr(JobStore, "activate", cancel_first)
    write_table(tmp_path / "docs.csv")
    result = cli("submit", str(tmp_path / "docs.csv"), "--column", "text")
    assert result.exit_code == EXIT_NOT_COMPLETED, result.output
    assert "cancelled during submission" in result.stderr and "queued 2 requests" not in result.stderr
    assert result.stdout == ""
    assert_failed_and_empty(queue_store, only_job(queue_store), JobStatus.CANCELLED)
