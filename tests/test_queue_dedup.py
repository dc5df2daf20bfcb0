"""Prefix-aware order and dedup of one shard's requests (ShardRun.prepare), through the tiny engine."""

from __future__ import annotations

import json
import threading

import pyarrow.parquet as pq

from harvest.queue import WorkerConfig, run_local
from harvest.queue.outputs import batch_output_line, iter_results


def line(custom_id: str, prompt: str, max_tokens: int = 4, **body) -> dict:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, **body}
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/completions", "body": body}


def run_job(client, engine, requests, **options):
    job = client.submit(requests, shard_size=16, **options)
    before = engine.stats.generated_offline
    run_local(client.store, engine, WorkerConfig(), exit_when_idle=True)
    rows = {row.custom_id: row for row in iter_results(client.store, job.id)}
    return job, rows, engine.stats.generated_offline - before


def payload(custom_id: str, prompt: str) -> dict:
    return {
        "custom_id": custom_id,
        "url": "/v1/completions",
        "params": {"max_tokens": 2, "temperature": 0},
        "prompt": prompt,
    }


PROMPTS = ["The miller", "Once upon a time", "The miller", "To make bread", "The miller", "Once upon a time"]


def test_identical_greedy_prompts_run_once_and_every_custom_id_gets_its_record(queue_client, queue_engine):
    requests = [line(f"r{i}", p) for i, p in enumerate(PROMPTS)]
    _, rows, generated = run_job(queue_client, queue_engine, requests)
    assert sorted(rows) == [f"r{i}" for i in range(len(PROMPTS))]
    assert generated == 3 * 4  # three distinct prompts, four tokens each
    for i, p in enumerate(PROMPTS):
        first = PROMPTS.index(p)
        assert rows[f"r{i}"].result.ok and rows[f"r{i}"].result.completion_tokens == 4
        assert rows[f"r{i}"].result.token_ids == rows[f"r{first}"].result.token_ids
        assert rows[f"r{i}"].result.deduplicated == (i != first)
        # the engine time was spent once: the copies carry none, so a job's sum is what it took
        assert (rows[f"r{i}"].result.device_seconds > 0) == (i == first)
    out = batch_output_line(rows["r2"], "tiny")
    assert out["custom_id"] == "r2" and out["response"]["body"]["x_harvest"] == {"deduplicated": True}
    assert "x_harvest" not in batch_output_line(rows["r0"], "tiny")["response"]["body"]


def test_duplicates_in_far_apart_lines_run_once_across_shards(queue_client, queue_engine, tmp_path):
    """Placed by prompt, the copies of a line 11 and 23 lines later share its shard and its
    result; in input order they are three shards' worth of work. Rows stay in input order."""
    prompts = [f"Line {i} asks its own question" for i in range(24)]
    for i in (0, 11, 23):
        prompts[i] = "The miller"
    requests = [line(f"r{i}", p) for i, p in enumerate(prompts)]
    generated = {}
    for group in (False, True):  # the placed job last: its export below
        job = queue_client.submit(requests, shard_size=4, group_by_prompt=group)
        before = queue_engine.stats.generated_offline
        run_local(queue_client.store, queue_engine, WorkerConfig(), exit_when_idle=True)
        generated[group] = queue_engine.stats.generated_offline - before
        rows = list(iter_results(queue_client.store, job.id))
        assert [row.custom_id for row in rows] == [f"r{i}" for i in range(24)]  # one each, in input order
        assert all(row.result.ok and row.result.completion_tokens == 4 for row in rows)
        assert rows[11].result.token_ids == rows[23].result.token_ids == rows[0].result.token_ids
        copies = [i for i, row in enumerate(rows) if row.result.deduplicated]
        assert copies == ([11, 23] if group else [])
    assert generated == {True: 22 * 4, False: 24 * 4}
    path = tmp_path / "out.jsonl"
    queue_client.export(job.id, path)
    assert [json.loads(x)["custom_id"] for x in path.read_text().splitlines()] == [f"r{i}" for i in range(24)]


def test_dedup_off_runs_every_line(queue_client, queue_engine, tmp_path):
    requests = [line(f"r{i}", p) for i, p in enumerate(PROMPTS)]
    job, rows, generated = run_job(queue_client, queue_engine, requests, dedup=False)
    assert generated == len(PROMPTS) * 4
    assert not any(row.result.deduplicated for row in rows.values())
    assert rows["r0"].result.token_ids == rows["r2"].result.token_ids  # greedy: the same anyway
    path = tmp_path / "out.parquet"
    queue_client.export(job.id, path)
    assert pq.read_table(path).column("deduplicated").to_pylist() == [False] * len(PROMPTS)


def test_only_deterministic_identical_requests_are_shared(queue_client, queue_engine):
    requests = [
        line("greedy4", "The miller"),
        line("greedy5", "The miller", max_tokens=5),  # other params: its own run
        line("seeded_a", "The miller", temperature=0.8, seed=7),
        line("seeded_b", "The miller", temperature=0.8, seed=7),  # same seed: shared
        line("random_a", "The miller", temperature=0.8),
        line("random_b", "The miller", temperature=0.8),  # unseeded sampling: never shared
    ]
    _, rows, generated = run_job(queue_client, queue_engine, requests)
    assert generated == 4 + 5 + 4 + 4 + 4
    assert [rows[c].result.deduplicated for c in ("seeded_b", "random_b", "greedy5")] == [True, False, False]
    assert rows["seeded_a"].result.token_ids == rows["seeded_b"].result.token_ids


def test_prepare_puts_requests_sharing_a_prefix_side_by_side(queue_engine):
    from harvest.queue.models import Lease
    from harvest.queue.shard import ShardRun
    from harvest.serving.engine_loop import EngineLoop

    shared = "Answer with one word. The question follows: "
    prompts = [shared + "red?", "Other words entirely", shared + "blue?", "Other words again"]
    prompts.append(prompts[0])
    lease = Lease("job", 0, 1, 1, [payload(f"r{i}", p) for i, p in enumerate(prompts)])
    loop = EngineLoop(queue_engine, name="engine-order-test")
    try:
        run = ShardRun(lease, loop, "w", threading.Lock())
        order = [p[1].index for p in run.prepare()]
    finally:
        loop.stop()
    assert sorted(order) == [0, 1, 2, 3]  # 4 repeats 0: it follows it, not the engine
    starts = [tuple(prompts[i].split()[:2]) for i in order]
    assert starts.count(starts[0]) == 2 and starts[0] == starts[1]  # same prefix: adjacent
    assert run.followers == {0: [4]}


def test_a_leader_finished_before_a_crash_still_answers_its_followers(queue_engine):
    from harvest.queue.models import Lease, Progress
    from harvest.queue.shard import ShardRun
    from harvest.serving.engine_loop import EngineLoop

    lease = Lease("job", 0, 2, 2, [payload("r0", "The miller"), payload("r1", "The miller")])
    lease.progress = {0: Progress([5, 6])}  # max_tokens 2: r0 was done, its result not yet written
    loop = EngineLoop(queue_engine, name="engine-resume-test")
    try:
        run = ShardRun(lease, loop, "w", threading.Lock())
        assert run.prepare() == []  # nothing left to compute
    finally:
        loop.stop()
    results = run.take_results()
    assert results[0].token_ids == results[1].token_ids == [5, 6]
    assert [results[0].deduplicated, results[1].deduplicated] == [False, True]


def test_prefix_primers_pick_one_request_per_shared_first_block():
    from harvest.queue.shard import prefix_primers

    a, b = list(range(100, 104)), list(range(200, 204))
    prompts = [[*a, 1], [*a, 2], [*b, 1], [9] * 5, [*a, 3], [*b, 2], a]  # block size 4
    assert prefix_primers(prompts, 4) == [0, 2]  # [9]*5 alone; `a` itself has no token past its block
    assert prefix_primers([[*a, 1], [*b, 1]], 4) == []  # nothing shared: nothing waits


def test_worker_admits_a_primer_per_prefix_before_the_rest(queue_client, queue_engine):
    shared = "Answer with one word. " * 6  # several full blocks
    requests = [line(f"r{i}", shared + f"question {i}?", max_tokens=2) for i in range(5)]
    requests.append(line("alone", "Nothing in common here", max_tokens=2))
    before = queue_engine.stats.prefix_hit_tokens
    _, rows, generated = run_job(queue_client, queue_engine, requests)
    assert len(rows) == 6 and all(r.result.ok for r in rows.values()) and generated == 12
    shared_rows = sorted((rows[f"r{i}"].result for i in range(5)), key=lambda r: r.ttft_s)
    primer, others = shared_rows[0], shared_rows[1:]
    assert all(r.ttft_s >= primer.latency_s for r in others)  # the others went in once it was done
    assert queue_engine.stats.prefix_hit_tokens - before >= 4 * 16  # each of those hit a block at least


def test_submit_flag_turns_dedup_off_per_job(redis_server, tmp_path):
    import json

    from typer.testing import CliRunner

    from harvest.cli import app
    from harvest.client import HarvestClient

    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(line(f"r{i}", "The miller")) + "\n" for i in range(3)))
    env = {"HARVEST_REDIS_URL": redis_server.url}
    store = HarvestClient(redis_server.url).store
    for flag, stored in (("--no-dedup", [False] * 3), ("--dedup", [True] * 3)):
        result = CliRunner().invoke(app, ["submit", str(path), flag], env=env)
        assert result.exit_code == 0, result.output
        job_id = result.stdout.strip().splitlines()[-1]
        assert [r.get("dedup", True) for r in store.shard_requests(job_id, 0)] == stored
