"""Inputs: every bad-input case is rejected with its line number before anything is queued."""

from __future__ import annotations

import csv
import json
import tracemalloc

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from harvest.queue import InvalidInputError, JobStatus
from harvest.queue.inputs import read_batch_jsonl
from harvest.queue.submit import validate


def line(custom_id: str, url: str = "/v1/completions", **body) -> dict:
    body = body or {"prompt": f"say {custom_id}", "max_tokens": 4}
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


def write_jsonl(path, lines: list) -> None:
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")


BAD_LINES = {
    # line number -> (raw line, words the reason must contain): the wording the HTTP routes use
    2: ('{"custom_id": "b", "url": ', "malformed JSON"),
    3: (line("a"), "duplicate custom_id 'a'"),
    4: (line("c", url="/v1/embeddings"), "unknown url '/v1/embeddings'"),
    5: (line("d", prompt="x", temperature=-1), "Invalid value for 'temperature'"),
    6: (line("e", prompt="x", max_tokens=0), "Invalid value for 'max_tokens'"),
    7: (line("f", prompt="x", top_p=1.5), "Invalid value for 'top_p'"),
    8: (
        line("g", prompt="x", max_tokens="ten"),
        "Invalid value for 'max_tokens': Input should be a valid integer",
    ),
    9: ({"url": "/v1/completions", "body": {"prompt": "x"}}, "custom_id must be a non-empty string"),
    10: (
        line("h", url="/v1/chat/completions", messages=[{"role": "robot", "content": "x"}]),
        "messages[0].role",
    ),
    11: (line("i", prompt=""), "prompt must not be empty"),
    12: ({"custom_id": "j", "method": "GET", "url": "/v1/completions", "body": {}}, "method must be POST"),
    13: (line("k", prompt="x", n=2), "Only n=1 is supported"),
}


@pytest.fixture
def mixed_file(tmp_path):
    path = tmp_path / "batch.jsonl"
    lines = [line("a")] + [BAD_LINES[n][0] for n in sorted(BAD_LINES)]
    lines += [
        line("z", url="/v1/chat/completions", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    ]
    write_jsonl(path, lines)
    return path


def test_each_bad_line_is_named_and_the_job_rejected(queue_client, queue_store, mixed_file):
    with pytest.raises(InvalidInputError) as info:
        queue_client.submit_file(mixed_file)
    errors = {e.line: e.reason for e in info.value.errors}
    assert set(errors) == set(BAD_LINES)
    for n, (_, words) in BAD_LINES.items():
        assert words in errors[n], (n, errors[n])
    job = queue_store.get_job(info.value.job_id)
    assert job.status is JobStatus.FAILED and job.num_errors == len(BAD_LINES)
    assert job.num_shards == 0 and queue_store.lease("w", 5) == []  # nothing was queued
    assert "line 3: duplicate custom_id 'a'" in str(info.value)


def test_allow_invalid_submits_the_rest(queue_client, mixed_file):
    job = queue_client.submit_file(mixed_file, allow_invalid=True)
    assert job.status is JobStatus.IN_PROGRESS
    assert job.request_counts.total == 2 and job.num_errors == len(BAD_LINES)
    specs = queue_client.store.shard_requests(job.id, 0)
    assert [s["custom_id"] for s in specs] == ["a", "z"]
    assert specs[1]["params"]["max_tokens"] == 3 and specs[1]["messages"][0]["content"] == "hi"


def test_python_list_inputs_and_bad_items(queue_client):
    job = queue_client.submit(["p0", [{"role": "user", "content": "hi"}], line("mine")], max_tokens=5)
    specs = queue_client.store.shard_requests(job.id, 0)
    assert [s["custom_id"] for s in specs] == ["request-0", "request-1", "mine"]
    assert [s["url"] for s in specs] == ["/v1/completions", "/v1/chat/completions", "/v1/completions"]
    assert specs[0]["params"]["max_tokens"] == 5 and specs[2]["params"]["max_tokens"] == 4
    with pytest.raises(InvalidInputError) as info:
        queue_client.submit(["ok", 42, [{"role": "user"}]])
    assert str(info.value.errors[0]).startswith("item 2: expected a prompt string")
    assert info.value.errors[1].line == 3
    with pytest.raises(InvalidInputError, match="no requests"):
        queue_client.submit([])
    with pytest.raises(InvalidInputError, match="job sampling defaults"):
        queue_client.submit(["x"], temperature=-2)


def test_parquet_csv_and_jsonl_tables_with_template(queue_client, tmp_path):
    texts = ["first doc", "second doc", "third doc"]
    pq.write_table(pa.table({"id": ["x", "y", "z"], "text": texts}), tmp_path / "docs.parquet")
    with open(tmp_path / "docs.csv", "w", newline="") as f:
        csv.writer(f).writerows([["text", "n"], *[[t, i] for i, t in enumerate(texts)]])
    write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in texts])
    for name, kwargs in [("docs.parquet", {"id_column": "id"}), ("docs.csv", {}), ("docs.jsonl", {})]:
        job = queue_client.submit_file(
            tmp_path / name, column="text", template="Summarise:\n{text}", **kwargs
        )
        specs = queue_client.store.shard_requests(job.id, 0)
        assert [s["prompt"] for s in specs] == [f"Summarise:\n{t}" for t in texts], name
        ids = ["x", "y", "z"] if name.endswith("parquet") else ["row-0", "row-1", "row-2"]
        assert [s["custom_id"] for s in specs] == ids


def test_table_errors_name_rows_and_columns(queue_client, tmp_path):
    write_jsonl(tmp_path / "t.jsonl", [{"text": "ok"}, "{broken", {"other": 1}, {"text": "fine"}])
    with pytest.raises(InvalidInputError) as info:
        queue_client.submit_file(tmp_path / "t.jsonl", column="text")
    assert [(e.line, e.reason.split(":")[0]) for e in info.value.errors] == [
        (2, "malformed JSON"),
        (3, "column 'text' is missing or null"),
    ]
    pq.write_table(pa.table({"body": ["a"]}), tmp_path / "t.parquet")
    with pytest.raises(InvalidInputError, match=r"no column\(s\) \['text'\]"):
        queue_client.submit_file(tmp_path / "t.parquet", column="text")
    with pytest.raises(InvalidInputError, match="needs --column"):
        queue_client.submit_file(tmp_path / "t.parquet")
    with pytest.raises(InvalidInputError, match="no such file"):
        queue_client.submit_file(tmp_path / "missing.jsonl")


def test_large_input_is_streamed_not_loaded(tmp_path):
    path = tmp_path / "big.jsonl"
    filler = "lorem ipsum " * 40
    with open(path, "w") as f:
        for i in range(40_000):  # ~20 MB
            f.write(json.dumps(line(f"id-{i}", prompt=f"{i} {filler}", max_tokens=8)) + "\n")
    size = path.stat().st_size
    tracemalloc.start()
    try:
        result = validate(lambda: read_batch_jsonl(path, {}))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.num_valid == 40_000 and result.num_errors == 0
    assert peak < size / 4, f"validation peaked at {peak / 2**20:.1f} MiB for a {size / 2**20:.1f} MiB file"
