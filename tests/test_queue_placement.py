"""Placement of a job's requests into shards by prompt (queue/placement.py), and results
still in input order after it (outputs.py): on their own, then through a real Redis."""

from __future__ import annotations

import json

from harvest.queue import JobOptions, JobStatus, Result
from harvest.queue.inputs import RequestSpec, read_items
from harvest.queue.outputs import iter_results
from harvest.queue.placement import Placement
from harvest.queue.submit import submit

INSTRUCTION = "Classify the sentiment of this review as positive or negative, in one word. Review: "
GREEDY = {"max_tokens": 4, "temperature": 0}


def spec(prompt: str, **params) -> RequestSpec:
    return RequestSpec("id", "/v1/completions", {**GREEDY, **params}, prompt)


def place(prompts: list[str], shard_size: int, **options) -> list[list[int]]:
    placement = Placement(shard_size, **options)
    for p in prompts:
        placement.add(spec(p))
    return list(placement.shards())


def computed(prompts: list[str], shards: list[list[int]]) -> int:
    """What a shard's dedup runs: one request per distinct (greedy) prompt in each shard."""
    return sum(len({prompts[i] for i in shard}) for shard in shards)


def far_apart_duplicates(n: int = 40) -> list[str]:
    prompts = [f"{i} has a prompt of its own" for i in range(n)]
    for i in (0, n // 2 - 3, n - 1):
        prompts[i] = "The miller's tale"
    return prompts


def test_identical_requests_far_apart_land_in_one_shard():
    prompts = far_apart_duplicates()
    placed = place(prompts, 8)
    (home,) = [shard for shard in placed if 0 in shard]
    assert {i for i in home if prompts[i] == "The miller's tale"} == {0, 17, 39}
    assert computed(prompts, placed) == 38  # 40 lines, three of them one request
    by_input = place(prompts, 8, by_prompt=False)
    assert by_input == [list(range(i, i + 8)) for i in range(0, 40, 8)]
    assert computed(prompts, by_input) == 40
    assert sorted(i for shard in placed for i in shard) == list(range(40))  # each request once


def test_a_shared_prefix_is_gathered_and_what_shares_nothing_keeps_input_order():
    prompts = [f"{i} alone" if i % 3 else INSTRUCTION + f"review {i}" for i in range(12)]
    order = [i for shard in place(prompts, 4) for i in shard]
    assert order == [0, 3, 6, 9, 1, 2, 4, 5, 7, 8, 10, 11]
    unshared = [f"{i} alone" for i in range(12)]
    assert [i for shard in place(unshared, 4) for i in shard] == list(range(12))


def test_a_run_of_identical_requests_is_split_only_when_bigger_than_a_shard():
    prompts = ["a", "b", "c", "X", "d", "X", "X"]
    assert place(prompts, 4) == [[0, 1, 2], [3, 5, 6, 4]]  # the first shard closes early for the run
    big = ["a", *["X"] * 9, "b"]
    shards = place(big, 4)
    assert shards == [[0], [1, 2, 3, 4], [5, 6, 7, 8], [9, 10]]
    assert computed(big, shards) == 5  # a, the run in three shards, b


def test_only_requests_computed_once_are_held_together():
    """Unseeded sampling, or dedup off: identical requests are not shared, so their run is cut
    like any other (they still sit side by side, for the prefix cache)."""
    prompts = ["a", "b", "c", "X", "X", "X"]
    for options, params in (({}, {"temperature": 0.7}), ({"dedup": False}, {})):
        placement = Placement(4, **options)
        for p in prompts:
            placement.add(spec(p, **params))
        assert list(placement.shards()) == [[0, 1, 2, 3], [4, 5]]
    seeded = Placement(4)
    for p in prompts:
        seeded.add(spec(p, temperature=0.7, seed=3))
    assert list(seeded.shards()) == [[0, 1, 2], [3, 4, 5]]


def test_chat_messages_and_token_ids_are_placed_by_their_content():
    system = {"role": "system", "content": INSTRUCTION}
    placement = Placement(2)
    items = [
        RequestSpec("a", "/v1/chat/completions", GREEDY, messages=[system, {"role": "user", "content": "1"}]),
        RequestSpec("b", "/v1/completions", GREEDY, prompt=[5, 6, 7]),
        RequestSpec("c", "/v1/chat/completions", GREEDY, messages=[{"content": "2", "role": "user"}]),
        RequestSpec("d", "/v1/completions", GREEDY, prompt=[5, 6, 7]),
        RequestSpec("e", "/v1/chat/completions", GREEDY, messages=[system, {"role": "user", "content": "3"}]),
    ]
    for item in items:
        placement.add(item)
    assert list(placement.shards()) == [[0, 4], [1, 3], [2]]


def test_results_of_a_placed_job_come_back_in_input_order(queue_store):
    prompts = far_apart_duplicates(12)
    opts = JobOptions(shard_size=4, defaults=GREEDY)
    job_id = submit(queue_store, lambda: read_items(prompts, opts.defaults), opts)
    shards = [queue_store.shard_requests(job_id, n) for n in range(3)]
    assert [[r["pos"] for r in shard] for shard in shards] == [[0, 3, 11, 1], [2, 4, 5, 6], [7, 8, 9, 10]]
    # results of the middle shard only: an open job shows what finished, in input order
    leases = queue_store.lease("w", 30, max_shards=2)
    assert [lease.shard for lease in leases] == [0, 1]
    done = {i: Result("completed", text="done") for i in range(4)}
    assert queue_store.write_results(leases[1], done) == ["ok"] * 4
    for lease in leases:
        queue_store.release(lease)
    assert [r.custom_id for r in iter_results(queue_store, job_id)] == [f"request-{i}" for i in (2, 4, 5, 6)]
    assert queue_store.cancel(job_id) is JobStatus.CANCELLED
    # closed: every request once, in input order, the unfinished ones as error rows
    rows = list(iter_results(queue_store, job_id))
    assert [r.custom_id for r in rows] == [f"request-{i}" for i in range(12)]
    assert [r.result.ok for r in rows] == [i in (2, 4, 5, 6) for i in range(12)]


def test_submit_places_by_prompt_unless_told_input_order(redis_server, queue_store, tmp_path):
    from typer.testing import CliRunner

    from harvest.cli import app

    path = tmp_path / "in.jsonl"
    prompts = far_apart_duplicates(8)  # the same prompt on lines 1, 2 and 8
    body = {"max_tokens": 2, "temperature": 0}
    lines = [{"custom_id": f"c{i}", "url": "/v1/completions", "body": {**body, "prompt": p}}
             for i, p in enumerate(prompts)]  # fmt: skip
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    for flag, first_shard in (("--group-by-prompt", [0, 1, 7, 2]), ("--input-order", [0, 1, 2, 3])):
        args = ["submit", str(path), "--shard-size", "4", flag, "--redis-url", redis_server.url]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        job_id = result.stdout.strip()
        assert [r["pos"] for r in queue_store.shard_requests(job_id, 0)] == first_shard
