"""`harvest submit|jobs|status|results|cancel|work`: output and exit codes scripts rely on."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from harvest.cli import app
from harvest.cli.exits import EXIT_BAD_INPUT, EXIT_NOT_COMPLETED, EXIT_NOT_FOUND, EXIT_REDIS, EXIT_TIMEOUT


@pytest.fixture
def cli(redis_server):
    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(app, [*args, "--redis-url", redis_server.url])

    return invoke


def write_batch(path, n: int, max_tokens: int = 4) -> None:
    lines = [
        {"custom_id": f"c{i}", "method": "POST", "url": "/v1/completions",
         "body": {"prompt": f"prompt {i}", "max_tokens": max_tokens, "temperature": 0}}
        for i in range(n)
    ]  # fmt: skip
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))


def test_submit_work_status_results(cli, tmp_path, tiny_model):
    write_batch(tmp_path / "in.jsonl", 5)
    submitted = cli("submit", str(tmp_path / "in.jsonl"), "--shard-size", "2")
    assert submitted.exit_code == 0, submitted.output
    job_id = submitted.stdout.strip()  # stdout holds the job id alone
    assert job_id.startswith("batch_") and "queued 5 requests in 3 shard(s)" in submitted.stderr

    worked = cli("work", "--local", "--model", str(tiny_model), "--exit-when-idle")
    assert worked.exit_code == 0, worked.output
    waited = cli("status", job_id, "--wait", "--json")
    assert waited.exit_code == 0
    status = json.loads(waited.stdout)
    assert status["status"] == "completed" and status["request_counts"]["completed"] == 5

    listed = cli("jobs")
    assert listed.exit_code == 0 and job_id in listed.stdout
    out = tmp_path / "out.jsonl"
    assert cli("results", job_id, "-o", str(out)).exit_code == 0
    assert [json.loads(x)["custom_id"] for x in out.read_text().splitlines()] == [f"c{i}" for i in range(5)]
    assert cli("results", job_id, "-o", str(tmp_path / "out.parquet")).exit_code == 0
    assert pq.read_table(tmp_path / "out.parquet").column("status").to_pylist() == ["completed"] * 5
    assert cli("results", job_id, "-o", str(tmp_path / "out.txt")).exit_code == 2


def test_bad_input_names_the_line(cli, tmp_path):
    path = tmp_path / "bad.jsonl"
    write_batch(path, 2)
    with open(path, "a") as f:
        f.write('{"custom_id": "c0", "url": "/v1/completions", "body": {"prompt": "dup"}}\n')
        f.write('{"custom_id": "x", "url": "/v1/completions", "body": {"prompt": "p", "top_p": 0}}\n')
    result = cli("submit", str(path))
    assert result.exit_code == EXIT_BAD_INPUT
    assert "line 3: duplicate custom_id 'c0'" in result.stderr
    assert "line 4: Invalid value for 'top_p'" in result.stderr  # the HTTP routes' wording
    assert result.stdout == ""
    skipped = cli("submit", str(path), "--allow-invalid")
    assert skipped.exit_code == 0 and "skipped 2 invalid line(s)" in skipped.stderr
    assert cli("submit", str(tmp_path / "t.csv")).exit_code == EXIT_BAD_INPUT


def test_table_submit_with_template(cli, tmp_path, queue_store):
    (tmp_path / "docs.csv").write_text("text\nalpha\nbeta\n")
    result = cli("submit", str(tmp_path / "docs.csv"), "--column", "text", "--template", "Summarise: {text}",
                 "--max-tokens", "7")  # fmt: skip
    assert result.exit_code == 0, result.output
    specs = queue_store.shard_requests(result.stdout.strip(), 0)
    assert [(s["prompt"], s["params"]["max_tokens"]) for s in specs] == [
        ("Summarise: alpha", 7),
        ("Summarise: beta", 7),
    ]


def test_cancel_timeout_unknown_and_unreachable(cli, tmp_path, redis_server):
    write_batch(tmp_path / "in.jsonl", 3)
    job_id = cli("submit", str(tmp_path / "in.jsonl")).stdout.strip()
    assert (
        cli("status", job_id, "--wait", "--timeout", "0.2", "--json").exit_code == EXIT_TIMEOUT
    )  # no worker
    cancelled = cli("cancel", job_id)
    assert cancelled.exit_code == 0 and "cancelled" in cancelled.stderr
    assert cli("status", job_id, "--wait").exit_code == EXIT_NOT_COMPLETED
    assert cli("status", "batch_nope").exit_code == EXIT_NOT_FOUND
    assert cli("cancel", "batch_nope").exit_code == EXIT_NOT_FOUND
    assert cli("work").exit_code == 2  # only --local exists here
    redis_server.stop()
    down = cli("jobs")
    assert down.exit_code == EXIT_REDIS and "cannot reach Redis" in down.stderr
    redis_server.start()  # for the fixture's teardown


def test_submit_with_a_workload_kind(redis_server, tmp_path):
    from typer.testing import CliRunner

    from harvest.cli import app
    from harvest.client import HarvestClient

    runner = CliRunner()
    env = {"HARVEST_REDIS_URL": redis_server.url}
    args = [
        "submit",
        "--workload",
        "synthetic",
        "--option",
        "num_requests=7",
        "--option",
        "prompt_len=fixed:12",
    ]
    result = runner.invoke(app, [*args, "--max-tokens", "5"], env=env)
    assert result.exit_code == 0, result.output
    job = HarvestClient(redis_server.url).get(result.stdout.strip().splitlines()[-1])
    assert job.request_counts.total == 7 and job.name == "synthetic"
    bad = runner.invoke(app, ["submit", "--workload", "synthetic", "--option", "nonsense=1"], env=env)
    assert bad.exit_code == 2 and "nonsense" in bad.output
    missing = runner.invoke(app, ["submit"], env=env)
    assert missing.exit_code == 2 and "--workload" in missing.output


def test_up_refuses_a_model_directory_without_a_config_before_starting_anything(tmp_path):
    result = CliRunner().invoke(app, ["up", "--model", str(tmp_path)])
    assert result.exit_code == EXIT_BAD_INPUT, result.output
    assert "--model" in result.output and "config.json" in result.output


def test_purge_refuses_a_running_job_unless_forced(cli, tmp_path, queue_store):
    write_batch(tmp_path / "in.jsonl", 3)
    job_id = cli("submit", str(tmp_path / "in.jsonl")).stdout.strip()
    refused = cli("purge", job_id)
    assert refused.exit_code == 2 and "in_progress" in refused.stderr and "force" in refused.stderr
    assert queue_store.get_job(job_id).request_counts.total == 3  # untouched
    purged = cli("purge", job_id, "--force")
    assert purged.exit_code == 0 and f"{job_id} purged" in purged.stderr
    assert list(queue_store.r.scan_iter(f"harvest:job:{job_id}*")) == []
    assert cli("purge", job_id).exit_code == EXIT_NOT_FOUND


def test_up_refuses_a_bad_job_ttl_before_starting_anything():
    result = CliRunner().invoke(app, ["up", "--job-ttl", "soon"])
    assert result.exit_code == EXIT_BAD_INPUT and "--job-ttl" in result.output
