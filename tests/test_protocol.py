"""The one request translator: every poison value is refused online (400 naming the param)
and offline (an error naming the line or row and the field), with the same verdict and
the same words on both paths; and the HTTP edge is bounded (413, 429, tokenizing off the
event loop)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import uvicorn
from fastapi.testclient import TestClient

from harvest.api import LocalBackend, build_app
from harvest.protocol.errors import InvalidRequest
from harvest.protocol.requests import CHAT, COMPLETIONS, parse_body
from harvest.protocol.sampling_params import SamplingParams
from harvest.queue import InvalidInputError, JobStatus, RequestSpec, WorkerConfig, run_local
from harvest.queue.inputs import InputError, read_batch_jsonl, read_items
from harvest.queue.submit import validate
from harvest.serving import EngineLoop
from tests.helpers import make_engine

MODEL = "tiny-llama"
MAX_MODEL_LEN = 256
USER = [{"role": "user", "content": "Tell me of the river."}]


def serve(tiny_model, backend_class: type[LocalBackend] = LocalBackend, **app_options) -> SimpleNamespace:
    engine = make_engine(tiny_model, max_num_seqs=4, max_model_len=MAX_MODEL_LEN)
    loop = EngineLoop(engine)
    backend = backend_class(loop, MODEL)
    return SimpleNamespace(engine=engine, loop=loop, backend=backend, app=build_app(backend, **app_options))


@pytest.fixture(scope="module")
def api(tiny_model) -> Iterator[SimpleNamespace]:
    served = serve(tiny_model)
    with TestClient(served.app) as client:
        served.client = client
        yield served
    served.loop.stop()


@contextmanager
def uvicorn_server(app) -> Iterator[str]:
    """A real server in a thread (the ASGI test client runs requests one at a time)."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:  # uvicorn offers no event to wait on
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)


def post(client, url: str, body: dict[str, Any]) -> httpx.Response:
    # json.dumps writes NaN/Infinity and \ud800 escapes, as a careless client would
    content = json.dumps({"model": MODEL} | body)
    return client.post(url, content=content, headers={"content-type": "application/json"})


def offline_verdict(url: str, body: dict[str, Any], defaults: dict | None = None) -> RequestSpec | InputError:
    """What HarvestClient.submit makes of the body as a batch request (Python objects, no JSON)."""
    ((line, item),) = list(read_items([{"custom_id": "x", "url": url, "body": body}], defaults or {}))
    assert line == 1
    return item


# ---------------------------------------------------------------------- one verdict, both paths

POISON = [
    # (url, body, the param an online 400 names)
    (COMPLETIONS, {"prompt": "hi", "temperature": 1e-40}, "temperature"),
    (COMPLETIONS, {"prompt": "hi", "temperature": float("nan")}, "temperature"),
    (COMPLETIONS, {"prompt": "hi", "temperature": float("inf")}, "temperature"),
    (COMPLETIONS, {"prompt": "hi", "temperature": 2.5}, "temperature"),
    (COMPLETIONS, {"prompt": "hi", "top_p": float("nan")}, "top_p"),
    (COMPLETIONS, {"prompt": "hi", "top_p": 0}, "top_p"),
    (COMPLETIONS, {"prompt": "hi", "top_k": -2}, "top_k"),
    (COMPLETIONS, {"prompt": "hi", "seed": 2**64}, "seed"),
    (COMPLETIONS, {"prompt": "hi", "seed": -(2**63) - 1}, "seed"),
    (COMPLETIONS, {"prompt": "hi", "stop": [["x"]]}, "stop"),
    (COMPLETIONS, {"prompt": "hi", "stop": ["s"] * 17}, "stop"),
    (COMPLETIONS, {"prompt": "hi", "stop": ["x" * 257]}, "stop"),
    (COMPLETIONS, {"prompt": "hi", "stop": ""}, "stop"),
    (COMPLETIONS, {"prompt": "hi", "stop": ["\ud800"]}, "stop"),
    (COMPLETIONS, {"prompt": "hi", "stop_token_ids": [-1]}, "stop_token_ids[0]"),
    (COMPLETIONS, {"prompt": [1, -1]}, "prompt"),
    (COMPLETIONS, {"prompt": [1, 2**63]}, "prompt"),
    (COMPLETIONS, {"prompt": "a lone \ud800 surrogate"}, "prompt"),
    (COMPLETIONS, {"prompt": "hi", "model": "\ud800"}, "model"),  # echoed in a 404, it was a 500
    (COMPLETIONS, {"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    (COMPLETIONS, {"prompt": "hi", "max_tokens": True}, "max_tokens"),
    (COMPLETIONS, {"prompt": "hi", "n": 2}, "n"),
    (COMPLETIONS, {"prompt": "hi", "logit_bias": {"1": 5}}, "logit_bias"),
    (COMPLETIONS, {"prompt": "hi", "presence_penalty": 0.5}, "presence_penalty"),
    (CHAT, {"messages": [{"role": "user", "content": "tail \udc00"}]}, "messages[0].content"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content"),
    (CHAT, {"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    (CHAT, {"messages": []}, "messages"),
    (CHAT, {"messages": USER, "max_completion_tokens": 0}, "max_completion_tokens"),
]
GOOD = [
    # accepted on both paths (they disagreed on some of these before)
    (COMPLETIONS, {"prompt": "hi", "top_k": -1}),
    (COMPLETIONS, {"prompt": "hi", "temperature": 0.001, "seed": 2**63 - 1}),
    (COMPLETIONS, {"prompt": "hi", "stop": "x", "stop_token_ids": [3]}),
    (COMPLETIONS, {"prompt": ["hi"]}),
    (CHAT, {"messages": [{"role": "developer", "content": "Be brief."}, *USER]}),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "text", "text": t} for t in "ab"]}]}),
]  # fmt: skip


@pytest.mark.parametrize(("url", "body", "param"), POISON)
def test_poison_is_refused_online_and_offline_with_the_same_words(api, url, body, param):
    r = post(api.client, url, {**body, "max_tokens": body.get("max_tokens", 1)})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", param)
    item = offline_verdict(url, body)
    assert isinstance(item, InputError) and item.line == 1 and item.unit == "item"
    assert item.reason == error["message"]  # one translator, one message
    assert post(api.client, COMPLETIONS, {"prompt": "still here", "max_tokens": 1}).status_code == 200


@pytest.mark.parametrize(("url", "body"), GOOD)
def test_good_bodies_are_accepted_on_both_paths(api, url, body):
    r = post(api.client, url, {**body, "max_tokens": 1})
    assert r.status_code == 200, r.text
    spec = offline_verdict(url, body)
    assert isinstance(spec, RequestSpec), spec
    if url == CHAT:  # normalised as online: developer is system, text parts are joined
        assert spec.messages[0]["role"] in ("system", "user") and isinstance(spec.messages[0]["content"], str)
    assert spec.params.get("top_k", 0) >= 0
    SamplingParams(**spec.params)  # what the worker builds from the stored payload


def test_body_fields_go_over_the_job_defaults():
    spec = offline_verdict(COMPLETIONS, {"prompt": "hi", "top_k": -1}, {"temperature": 0, "top_k": 5})
    assert spec.params == {"temperature": 0, "top_k": 0}
    with pytest.raises(InvalidInputError, match="job sampling defaults: Invalid value for 'temperature'"):
        offline_verdict(COMPLETIONS, {"prompt": "hi"}, {"temperature": 1e-9})


def test_python_ints_past_int64_are_refused_before_they_reach_a_shard():
    # json.dumps cannot write an int of more than 4,300 digits: it would fail writing the shard
    item = offline_verdict(COMPLETIONS, {"prompt": "hi", "max_tokens": 10**5000})
    assert isinstance(item, InputError) and item.reason.startswith("Invalid value for 'max_tokens'")


def test_the_translator_imports_neither_torch_nor_the_http_layer():
    import subprocess
    import sys

    code = (
        "import sys, harvest.protocol.prepare, harvest.queue.inputs, harvest.queue.tables;"
        "print(sorted(m for m in ('torch', 'harvest.api', 'harvest.engine') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------------- model-dependent checks

MODEL_POISON = [
    # (body, param): refused where the model is known, by one function on both paths
    ({"prompt": [1, 512]}, "prompt"),  # the tiny model's vocabulary has 512 entries
    ({"prompt": "hi", "stop_token_ids": [10**6]}, "stop_token_ids"),
    ({"prompt": "hi", "max_tokens": 10**6}, "max_tokens"),
]


def test_model_dependent_checks_are_one_function_online_and_offline(api, queue_client, queue_engine):
    online = []
    for body, param in MODEL_POISON:
        r = post(api.client, COMPLETIONS, body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
        online.append(r.json()["error"]["message"])
    lines = [
        {"custom_id": f"bad-{i}", "url": COMPLETIONS, "body": body}
        for i, (body, _) in enumerate(MODEL_POISON)
    ]
    job = queue_client.submit(["a good one", *lines], max_tokens=3, temperature=0)
    run_local(queue_client.store, queue_engine, WorkerConfig(), exit_when_idle=True)
    job = queue_client.wait(job.id, timeout=10, progress=False)
    assert job.status is JobStatus.COMPLETED
    assert (job.request_counts.completed, job.request_counts.failed) == (1, 3)
    rows = {r["custom_id"]: r for r in queue_client.results(job.id).to_pylist()}
    assert rows["request-0"]["status"] == "completed"
    for i, message in enumerate(online):
        row = rows[f"bad-{i}"]
        assert (row["status"], row["error_code"]) == ("failed", "invalid_request")
        if i < 2:  # same vocabulary; the context differs between the two engines
            assert row["error_message"] == message
        else:
            assert row["error_message"].startswith("max_tokens is too large: 1000000.")


# ---------------------------------------------------------------------- offline files


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


def test_parse_body_names_what_is_not_a_request():
    for url, body, param in [
        ("/v1/embeddings", {}, "url"),
        (COMPLETIONS, [1], "body"),
        (COMPLETIONS, {}, "prompt"),
    ]:
        with pytest.raises(InvalidRequest) as info:
            parse_body(url, body)
        assert info.value.param == param


# ---------------------------------------------------------------------- the HTTP edge


def test_unparseable_numbers_are_a_400_online(api):
    body = json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 1}).replace("1}", "9" * 5001 + "}")
    r = api.client.post(COMPLETIONS, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_body_over_the_cap_is_413_declared_or_streamed(tiny_model):
    served = serve(tiny_model, max_body_bytes=4096)
    body = json.dumps({"model": MODEL, "prompt": "x" * 8192, "max_tokens": 1}).encode()
    try:
        with TestClient(served.app) as client:
            r = client.post(COMPLETIONS, content=body, headers={"content-type": "application/json"})
            assert r.status_code == 413, r.text
            error = r.json()["error"]
            assert error["code"] == "request_too_large" and "4096 bytes" in error["message"]

            def chunks() -> Iterator[bytes]:  # no Content-Length: the bytes are counted as they come
                for i in range(0, len(body), 1000):
                    yield body[i : i + 1000]

            r = client.post(COMPLETIONS, content=chunks(), headers={"content-type": "application/json"})
            assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
            ok = post(client, COMPLETIONS, {"prompt": "small", "max_tokens": 1})
            assert ok.status_code == 200
    finally:
        served.loop.stop()


class WatchedTokenizer:
    """The engine's tokenizer, telling when a large encode starts and ends."""

    def __init__(self, tokenizer, large: int) -> None:
        self._tokenizer = tokenizer
        self._large = large
        self.started = threading.Event()
        self.finished = threading.Event()

    def encode(self, text, *args, **kwargs):
        large = len(text) >= self._large
        if large:
            self.started.set()
        try:
            return self._tokenizer.encode(text, *args, **kwargs)
        finally:
            if large:
                self.finished.set()

    def __len__(self) -> int:
        return len(self._tokenizer)

    def __getattr__(self, name: str):
        return getattr(self._tokenizer, name)


class WatchedBackend(LocalBackend):
    watched: WatchedTokenizer

    @property
    def tokenizer(self) -> WatchedTokenizer:
        return self.watched


def test_health_answers_while_a_huge_prompt_is_tokenized(tiny_model):
    served = serve(tiny_model, WatchedBackend)
    prompt = "the river runs " * 470_000  # 7 MB: under the 8 MiB cap, seconds to tokenize
    watched = served.backend.watched = WatchedTokenizer(served.engine.tokenizer, large=len(prompt))
    answer: dict[str, httpx.Response] = {}
    try:
        with uvicorn_server(served.app) as base_url:

            def send_huge() -> None:
                with httpx.Client(base_url=base_url, timeout=120) as client:
                    answer["huge"] = post(client, COMPLETIONS, {"prompt": prompt, "max_tokens": 1})

            sender = threading.Thread(target=send_huge)
            sender.start()
            assert watched.started.wait(60), "the huge prompt was never tokenized"
            with httpx.Client(base_url=base_url, timeout=10) as client:
                t0 = time.monotonic()
                health = client.get("/health")
                took = time.monotonic() - t0
            still_tokenizing = not watched.finished.is_set()
            sender.join(120)
    finally:
        served.loop.stop()
    assert health.status_code == 200 and took < 0.5, took
    assert still_tokenizing  # /health was answered during the encode, not after it
    huge = answer["huge"]
    assert huge.status_code == 400 and huge.json()["error"]["code"] == "context_length_exceeded"


@pytest.mark.parametrize(("num_blocks", "expected"), [(1024, 8), (64, 4)])
def test_worker_backend_sizes_its_queue_from_the_kv_pool(tiny_model, num_blocks, expected):
    from actors.gpu_worker import WorkerBackend

    engine = make_engine(tiny_model, max_num_seqs=4, num_blocks=num_blocks, max_model_len=MAX_MODEL_LEN)
    worker = SimpleNamespace(engine=engine, loop=EngineLoop(engine))
    try:
        # 1024 blocks of 4 tokens hold 8 requests of 512 tokens; 64 blocks hold fewer than a batch
        assert WorkerBackend(worker, MODEL).max_pending == expected
        assert WorkerBackend(worker, MODEL, max_pending=2).max_pending == 2
    finally:
        worker.loop.stop()
