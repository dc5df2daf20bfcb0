"""Inputs: every bad-input case is rejected with its line number before anything is queued."""

from __future__ import annotations

import csv
import json
import tracemalloc

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from harvest.protocol.requests import COMPLETIONS
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


# ---------------------------------------------------------------------- poison lines and rows


def test_jsonl_poison_lines_name_their_line(tmp_path):
    def line(cid: str, **body) -> str:
        return json.dumps({"custom_id": cid, "url": COMPLETIONS, "body": {"prompt": "hi", **body}})

    lines = [
        line("ok"),
        line("nan", temperature=float("nan")),  # json.dumps writes NaN, json.loads would take it
        line("inf", top_p=float("inf")),
        '{"custom_id": "digits", "url": "/v1/completions", "body": {"prompt": "hi", "max_tokens": '
        + "9" * 5001
        + "}}",
        line("seed", seed=2**64),
        line("surrogate", prompt="x\ud800"),
        json.dumps({"custom_id": "id\udfff", "url": COMPLETIONS, "body": {"prompt": "hi"}}),
        line("stop", stop=[["x"]]),
        line("tiny", temperature=1e-40),
        line("ok2", top_k=-1),
    ]
    path = tmp_path / "batch.jsonl"
    path.write_text("\n".join(lines) + "\n")
    v = validate(lambda: read_batch_jsonl(path, {}))
    assert v.num_valid == 2
    reasons = {e.line: e.reason for e in v.errors}
    assert sorted(reasons) == [2, 3, 4, 5, 6, 7, 8, 9]
    assert reasons[2].startswith("malformed JSON: NaN is not valid JSON")
    assert reasons[3].startswith("malformed JSON: Infinity is not valid JSON")
    assert reasons[4].startswith("malformed JSON:") and "digits" in reasons[4]
    assert reasons[5].startswith("Invalid value for 'seed'")
    assert reasons[6].startswith("Invalid value for 'prompt'") and "surrogate" in reasons[6]
    assert reasons[7].startswith("custom_id holds an unpaired UTF-16 surrogate")
    assert reasons[8].startswith("Invalid value for 'stop'")
    assert reasons[9].startswith("Invalid value for 'temperature'")


def submit_errors(queue_client, path, **kwargs) -> list[tuple[int, str]]:
    with pytest.raises(InvalidInputError) as info:
        queue_client.submit_file(path, **kwargs)
    return [(e.line, e.reason) for e in info.value.errors]


def test_csv_parse_errors_name_their_line(queue_client, tmp_path):
    path = tmp_path / "docs.csv"
    path.write_text('text,n\nfirst,1\nsecond,2,extra\n"multi\nline",3\nfourth,4\nfifth,5,6,7\n')
    errors = submit_errors(queue_client, path, column="text")
    assert [line for line, _ in errors] == [3, 6]  # Arrow counts a quoted multi-line value as one line
    assert all("cannot parse CSV row: expected 2 fields" in reason for _, reason in errors)
    job = queue_client.submit_file(path, column="text", allow_invalid=True)
    specs = queue_client.store.shard_requests(job.id, 0)
    assert [s["prompt"] for s in specs] == ["first", "multi\nline", "fourth"]
    assert [s["custom_id"] for s in specs] == ["row-0", "row-2", "row-3"]  # the bad row keeps its place

    broken = tmp_path / "broken.csv"
    broken.write_bytes(b"text\nfine\nbad \xff bytes\n")
    ((line, reason),) = submit_errors(queue_client, broken, column="text")
    assert line == 3 and reason.startswith("cannot read broken.csv as CSV (line 3 is not UTF-8)")


@pytest.mark.parametrize("template", ["{text:d}", "{text!r}", "{0}", "{}", "{text.upper}", "{text"])
def test_template_format_specs_and_positional_fields_are_refused_up_front(queue_client, tmp_path, template):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"text": "a"}) + "\n")
    ((line, reason),) = submit_errors(queue_client, path, template=template)
    assert line == 0 and reason.startswith(f"bad prompt template {template!r}")


def test_non_string_prompt_columns_are_refused_naming_column_and_type(queue_client, tmp_path):
    for name, column, type_name in [
        ("ints", pa.array([1, 2], pa.int64()), "int64"),
        ("lists", pa.array([["a"], ["b"]]), "list<"),
        ("bytes", pa.array([b"a", b"b"], pa.binary()), "binary"),
    ]:
        path = tmp_path / f"{name}.parquet"
        pq.write_table(pa.table({"text": column}), path)
        ((line, reason),) = submit_errors(queue_client, path, column="text")
        assert line == 0 and reason.startswith(f"column 'text' in {name}.parquet has type {type_name}")
        assert reason.endswith("prompt columns must be strings")
    # an int id column is fine, a dictionary-encoded string column too
    pq.write_table(
        pa.table({"id": [7, 8], "text": pa.array(["a", "b"]).dictionary_encode()}), tmp_path / "ok.parquet"
    )
    job = queue_client.submit_file(tmp_path / "ok.parquet", column="text", id_column="id")
    assert [s["custom_id"] for s in queue_client.store.shard_requests(job.id, 0)] == ["7", "8"]

    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(json.dumps({"text": t, "topic": "x"}) for t in ["fine", 5, ["a"], "also fine"]))
    errors = submit_errors(queue_client, path, template="{topic}: {text}")
    assert errors == [(2, "column 'text' holds int 5, not a string"),
                      (3, "column 'text' holds list ['a'], not a string")]  # fmt: skip


def test_table_prompts_go_through_the_translator(queue_client, tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in ["fine", "x\ud800"]) + "\n")
    errors = submit_errors(queue_client, path, column="text", chat=True)
    assert len(errors) == 1 and errors[0][0] == 2
    assert errors[0][1].startswith("Invalid value for 'messages[0].content'")
