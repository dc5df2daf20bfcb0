"""The OpenAI Files and Batches APIs through the official `openai` client: a real app over
the tiny model, a real Redis, a real offline worker running the batches."""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import openai
import pytest
from fastapi.testclient import TestClient

from harvest.api import LocalBackend, build_app
from harvest.api.multipart import MultipartParser, PartData, PartEnd, PartStart
from harvest.batch import BatchService, FileStore
from harvest.client import HarvestClient
from harvest.queue import JobStore, WorkerConfig, run_local
from harvest.serving import EngineLoop
from tests.helpers import make_engine, uvicorn_server

MODEL = "tiny-llama"
COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"


def line(custom_id: str, max_tokens: int = 4, url: str = COMPLETIONS, **body) -> dict:
    if url == CHAT:
        body.setdefault("messages", [{"role": "user", "content": f"Tell me of {custom_id}"}])
    else:
        body.setdefault("prompt", f"The story of {custom_id}")
    body = {"model": MODEL, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, **body}
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


def jsonl(lines: list[dict | str]) -> bytes:
    return "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines).encode()


def upload(client: openai.OpenAI, lines: list[dict | str], name: str = "in.jsonl"):
    return client.files.create(file=(name, io.BytesIO(jsonl(lines))), purpose="batch")


def read_lines(client: openai.OpenAI, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    return [json.loads(x) for x in client.files.content(file_id).text.splitlines()]


def wait_for(predicate, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)  # polling the API, as a batch client does
    return value


@pytest.fixture(scope="module")
def backend(tiny_model) -> Iterator[LocalBackend]:
    """One online engine for the module: the Batch API only names its model."""
    loop = EngineLoop(make_engine(tiny_model, max_num_seqs=4, max_model_len=256))
    yield LocalBackend(loop, MODEL)
    loop.stop()


def make_api(backend, redis_url: str, files_dir: Path, **options) -> SimpleNamespace:
    """The app with the Batch API over `redis_url`, and an openai client talking to it."""
    max_body_bytes = options.pop("max_body_bytes", None)
    api_key = options.pop("api_key", None)
    service = BatchService(redis_url, files_dir, **options)
    app_options = {"max_body_bytes": max_body_bytes} if max_body_bytes else {}
    app_options |= {"api_key": api_key} if api_key else {}
    http = TestClient(build_app(backend, batch=service, **app_options))
    client = openai.OpenAI(base_url="http://testserver/v1", api_key="none", http_client=http, max_retries=0)
    return SimpleNamespace(service=service, http=http, client=client, files_dir=files_dir)


@pytest.fixture
def api(backend, redis_server, tmp_path) -> SimpleNamespace:
    return make_api(backend, redis_server.url, tmp_path / "files")


def run_worker(redis_url: str, engine) -> None:
    run_local(JobStore.from_url(redis_url), engine, WorkerConfig(), exit_when_idle=True)


def test_upload_create_run_download_agrees_with_harvest_results(api, redis_server, queue_engine):
    lines = [
        line("a"),
        line("b", max_tokens=6),
        line("c", url=COMPLETIONS, prompt="word " * 1500),
        line("d", max_tokens=5),
    ]
    f = upload(api.client, lines, "stories.jsonl")
    assert (f.object, f.purpose, f.filename, f.bytes) == ("file", "batch", "stories.jsonl", len(jsonl(lines)))
    assert f.id.startswith("file-") and api.client.files.retrieve(f.id) == f
    assert api.client.files.content(f.id).content == jsonl(lines)

    batch = api.client.batches.create(
        input_file_id=f.id, endpoint=COMPLETIONS, completion_window="1h", metadata={"team": "docs"}
    )
    assert batch.status == "in_progress" and batch.request_counts.total == 4
    assert batch.expires_at - batch.created_at == 3600 and batch.metadata == {"team": "docs"}
    assert (batch.input_file_id, batch.endpoint, batch.completion_window) == (f.id, COMPLETIONS, "1h")

    run_worker(redis_server.url, queue_engine)
    batch = api.client.batches.retrieve(batch.id)
    assert batch.status == "completed" and batch.completed_at is not None
    assert (batch.request_counts.completed, batch.request_counts.failed) == (3, 1)
    output, errors = read_lines(api.client, batch.output_file_id), read_lines(api.client, batch.error_file_id)
    assert [x["custom_id"] for x in output] == ["a", "b", "d"]
    assert [(x["custom_id"], x["error"]["code"]) for x in errors] == [("c", "invalid_request")]

    # the output file and `harvest results` (HarvestClient.results) agree line for line
    rows = HarvestClient(redis_server.url).results(batch.id).to_pylist()
    by_id = {x["custom_id"]: x for x in output + errors}
    assert [r["custom_id"] for r in rows] == ["a", "b", "c", "d"]
    for row in rows:
        got = by_id[row["custom_id"]]
        if row["status"] == "completed":
            body = got["response"]["body"]
            assert got["response"]["status_code"] == 200 and got["error"] is None
            assert body["choices"][0]["text"] == row["output"]
            assert body["usage"]["completion_tokens"] == row["completion_tokens"]
        else:
            assert got["response"] is None and got["error"]["message"] == row["error_message"]

    # each body is the object the online route answers the same request with
    online = api.http.post(
        COMPLETIONS,
        json={
            "model": MODEL,
            "prompt": "The story of a",
            "max_tokens": 4,
            "temperature": 0,
            "ignore_eos": True,
        },
    ).json()
    body = output[0]["response"]["body"]
    assert set(body) == set(online) and body["model"] == MODEL
    assert set(body["choices"][0]) == set(online["choices"][0])
    assert body["choices"][0]["text"] == online["choices"][0]["text"]

    # the files harvest wrote are listed as batch_output, once: a second read writes nothing new
    assert api.client.batches.retrieve(batch.id).output_file_id == batch.output_file_id
    outputs = api.client.files.list(purpose="batch_output").data
    assert sorted(x.id for x in outputs) == sorted([batch.output_file_id, batch.error_file_id])


def test_chat_batch_output_matches_the_online_chat_object(api, redis_server, queue_engine):
    f = upload(api.client, [line("q1", url=CHAT), line("q2", url=CHAT, max_tokens=3)])
    batch = api.client.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h")
    run_worker(redis_server.url, queue_engine)
    batch = api.client.batches.retrieve(batch.id)
    assert batch.status == "completed" and batch.error_file_id is None
    output = read_lines(api.client, batch.output_file_id)
    request = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Tell me of q1"}],
        "max_tokens": 4,
        "temperature": 0,
        "ignore_eos": True,
    }
    online = api.http.post(CHAT, json=request).json()
    body = output[0]["response"]["body"]
    assert set(body) == set(online) and body["object"] == "chat.completion"
    assert set(body["choices"][0]) == set(online["choices"][0])
    assert body["choices"][0]["message"] == online["choices"][0]["message"]


def test_bad_lines_fail_validation_naming_each_line(api, queue_store):
    lines = [
        line("ok"),
        "{not json",
        line("chat", url=CHAT),
        {"method": "POST", "url": COMPLETIONS, "body": {"prompt": "x"}},
        line("ok"),
    ]
    f = upload(api.client, lines)
    batch = api.client.batches.create(input_file_id=f.id, endpoint=COMPLETIONS, completion_window="24h")
    assert batch.status == "failed" and batch.failed_at is not None
    errors = [(e.line, e.code, e.param) for e in batch.errors.data]
    assert errors == [
        (2, "invalid_json_line", None),
        (3, "mismatched_endpoint", "url"),
        (4, "invalid_custom_id", "custom_id"),
        (5, "invalid_custom_id", "custom_id"),
    ]
    assert "duplicate custom_id 'ok'" in batch.errors.data[3].message
    assert queue_store.get_job(batch.id).num_shards == 0  # nothing was queued
    assert batch.output_file_id is None and batch.error_file_id is None


class HeldEngine:
    """The engine, whose steps after the first `free_steps` wait for `release`: the seam that
    holds a batch mid-run, its short requests finished and its long one not."""

    def __init__(self, engine, free_steps: int) -> None:
        self.engine = engine
        self.steps_left = free_steps
        self.release = threading.Event()

    def step(self):
        if self.steps_left == 0:
            assert self.release.wait(60)
        self.steps_left = max(0, self.steps_left - 1)
        return self.engine.step()

    def __getattr__(self, name: str):
        return getattr(self.engine, name)


def test_cancel_mid_run_keeps_finished_lines(api, redis_server, queue_engine):
    lines = [line(f"short-{i}", max_tokens=1) for i in range(3)] + [line("long", max_tokens=64)]
    f = upload(api.client, lines)
    batch = api.client.batches.create(input_file_id=f.id, endpoint=COMPLETIONS, completion_window="24h")
    engine, stop = HeldEngine(queue_engine, free_steps=2), threading.Event()
    config = WorkerConfig(visibility_timeout_s=0.6)  # renews (and so learns of the cancel) every 0.2 s
    store = JobStore.from_url(redis_server.url)
    worker = threading.Thread(target=run_local, args=(store, engine, config), kwargs={"stop": stop.is_set})
    worker.start()
    try:
        wait_for(lambda: api.client.batches.retrieve(batch.id).request_counts.completed == 3)
        assert api.client.batches.cancel(batch.id).status == "cancelling"  # the worker holds the shard
        batch = wait_for(lambda: (b := api.client.batches.retrieve(batch.id)).status == "cancelled" and b)
    finally:
        stop.set()
        engine.release.set()
        worker.join(30)
    assert batch.cancelling_at is not None and batch.cancelled_at is not None
    output, errors = read_lines(api.client, batch.output_file_id), read_lines(api.client, batch.error_file_id)
    assert [x["custom_id"] for x in output] == ["short-0", "short-1", "short-2"]
    assert [(x["custom_id"], x["error"]["code"]) for x in errors] == [("long", "batch_cancelled")]
    counts = batch.request_counts
    assert (counts.total, counts.completed, counts.failed) == (4, len(output), len(errors))
    rows = HarvestClient(redis_server.url).results(batch.id).to_pylist()
    assert [r["custom_id"] for r in rows] == [x["custom_id"] for x in output + errors]


def test_expired_batch_gives_every_line_its_record(backend, redis_server, tmp_path):
    api = make_api(backend, redis_server.url, tmp_path / "files", min_window_s=1)  # seconds, for a test
    f = upload(api.client, [line("a"), line("b")], "éclair.jsonl")
    batch = api.client.batches.create(input_file_id=f.id, endpoint=COMPLETIONS, completion_window="1s")
    assert batch.expires_at is not None
    # no worker runs it: the window passes (a deadline, so poll as a client does)
    batch = wait_for(lambda: (b := api.client.batches.retrieve(batch.id)).status == "expired" and b)
    assert batch.expired_at is not None and batch.output_file_id is None
    errors = read_lines(api.client, batch.error_file_id)
    assert [(x["custom_id"], x["error"]["code"]) for x in errors] == [
        ("a", "batch_expired"),
        ("b", "batch_expired"),
    ]
    counts = batch.request_counts
    assert (counts.total, counts.completed, counts.failed) == (2, 0, 2)
    content = api.http.get(f"/v1/files/{f.id}/content")
    assert content.headers["content-disposition"] == "attachment; filename*=UTF-8''%C3%A9clair.jsonl"


def test_creating_a_batch_leaves_the_app_serving(api):
    """Validation runs in a thread: held there (a seam around the registry's create), the app
    still answers other requests."""
    f = upload(api.client, [line("a")])
    inside, release = threading.Event(), threading.Event()
    create = api.service.batches.create

    def held_create(*args, **kwargs):
        inside.set()
        assert release.wait(30)
        return create(*args, **kwargs)

    api.service.batches.create = held_create
    with uvicorn_server(api.http.app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        creating = threading.Thread(
            target=lambda: client.batches.create(
                input_file_id=f.id, endpoint=COMPLETIONS, completion_window="24h"
            )
        )
        creating.start()
        assert inside.wait(30)
        assert [m.id for m in client.models.list()] == [MODEL]  # answered while create is held
        assert client.files.retrieve(f.id).id == f.id
        release.set()
        creating.join(30)
    assert len(api.client.batches.list().data) == 1


def test_list_pages_newest_first(api):
    f = upload(api.client, [line("x")])
    ids = [
        api.client.batches.create(input_file_id=f.id, endpoint=COMPLETIONS, completion_window="30m").id
        for _ in range(3)
    ]
    page = api.client.batches.list(limit=2)
    assert [b.id for b in page.data] == ids[::-1][:2] and page.has_more
    assert [b.id for b in api.client.batches.list(limit=2)] == ids[::-1]  # the SDK follows `after`
    assert api.client.batches.list(after=ids[0]).data == []
    more = [upload(api.client, [line("y")], f"f{i}.jsonl").id for i in range(2)]
    files = api.client.files.list(limit=1)
    assert [x.id for x in files.data] == [more[1]] and files.has_more
    assert [x.id for x in api.client.files.list(limit=1, order="asc")] == [f.id, *more]


def test_delete_and_not_found_shapes(api):
    f = upload(api.client, [line("x")])
    stored = api.files_dir / f"{f.id}.jsonl"
    assert stored.is_file()
    deleted = api.client.files.delete(f.id)
    assert (deleted.id, deleted.deleted) == (f.id, True) and not stored.exists()
    for call in (
        lambda: api.client.files.retrieve(f.id),
        lambda: api.client.files.content(f.id),
        lambda: api.client.files.delete(f.id),
    ):
        with pytest.raises(openai.NotFoundError) as exc:
            call()
        assert exc.value.body["code"] == "file_not_found" and f.id in exc.value.body["message"]
    with pytest.raises(openai.NotFoundError) as exc:
        api.client.batches.create(input_file_id=f.id, endpoint=COMPLETIONS, completion_window="24h")
    assert exc.value.body["param"] == "input_file_id"
    for call in (
        lambda: api.client.batches.retrieve("batch_nope"),
        lambda: api.client.batches.cancel("batch_nope"),
    ):
        with pytest.raises(openai.NotFoundError) as exc:
            call()
        assert exc.value.body["code"] == "batch_not_found"


def test_bad_create_parameters_name_the_field(api):
    f = upload(api.client, [line("x")])
    for params, field in [
        ({"endpoint": "/v1/embeddings"}, "endpoint"),
        ({"completion_window": "soon"}, "completion_window"),
        ({"completion_window": "0h"}, "completion_window"),
    ]:
        with pytest.raises(openai.BadRequestError) as exc:
            api.client.batches.create(
                **{"input_file_id": f.id, "endpoint": COMPLETIONS, "completion_window": "24h", **params}
            )
        assert exc.value.body["param"] == field
    with pytest.raises(openai.BadRequestError) as exc:
        api.client.batches.create(
            input_file_id=f.id,
            endpoint=COMPLETIONS,
            completion_window="24h",
            metadata={f"k{i}": "v" for i in range(17)},
        )
    assert exc.value.body["param"] == "metadata"
    with pytest.raises(openai.BadRequestError) as exc:
        api.client.files.create(file=("x.jsonl", io.BytesIO(b"{}\n")), purpose="fine-tune")
    assert exc.value.body["param"] == "purpose"
    assert api.client.batches.list().data == [] and [x.id for x in api.client.files.list()] == [f.id]


def test_oversize_upload_is_refused_and_leaves_nothing(backend, redis_server, tmp_path):
    api = make_api(backend, redis_server.url, tmp_path / "files", max_file_bytes=1000, max_body_bytes=4096)
    small = [line(f"r{i}", prompt="p" * 50) for i in range(30)]  # ~4.5 KB: over the app's JSON cap
    assert len(jsonl(small)) > 4096
    with pytest.raises(openai.APIStatusError) as exc:
        upload(api.client, small)  # streamed past the file limit, then refused
    assert exc.value.status_code == 413 and exc.value.body["code"] == "file_too_large"
    huge = b"x" * (200 << 10)  # past even the route's body cap: refused before it is read
    with pytest.raises(openai.APIStatusError) as exc:
        api.client.files.create(file=("big.jsonl", io.BytesIO(huge)), purpose="batch")
    assert exc.value.status_code == 413 and exc.value.body["code"] == "request_too_large"
    assert api.client.files.list().data == [] and list(api.files_dir.iterdir()) == []

    # the file route's cap is its own: a file over the JSON cap but within the file limit passes
    roomy = make_api(backend, redis_server.url, tmp_path / "files", max_body_bytes=4096)
    assert upload(roomy.client, small).bytes == len(jsonl(small))
    with pytest.raises(openai.APIStatusError) as exc:
        roomy.client.completions.create(model=MODEL, prompt="p" * 5000, max_tokens=1)
    assert exc.value.status_code == 413


def test_without_a_job_store_the_routes_say_so(backend):
    client = openai.OpenAI(
        base_url="http://testserver/v1",
        api_key="none",
        max_retries=0,
        http_client=TestClient(build_app(backend)),
    )
    for call in (client.files.list, lambda: client.batches.retrieve("batch_x")):
        with pytest.raises(openai.APIStatusError) as exc:
            call()
        assert exc.value.status_code == 501 and "job store" in exc.value.message


def test_multipart_parser_takes_the_body_in_any_split():
    body = (
        b'preamble\r\n--XyZ\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
        b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="a \\"b\\".jsonl"\r\n'
        b"Content-Type: application/jsonl\r\n\r\nline 1 --XyZ\r\n-XyZ\r\r\nline 2\r\n--XyZ--\r\n"
    )
    expected = [("purpose", None, b"batch"), ("file", 'a "b".jsonl', b"line 1 --XyZ\r\n-XyZ\r\r\nline 2")]
    for size in (1, 2, 3, 7, len(body)):
        parser, parts = MultipartParser(b"XyZ"), []
        for i in range(0, len(body), size):
            for event in parser.feed(body[i : i + size]):
                if isinstance(event, PartStart):
                    parts.append([event.name, event.filename, b""])
                elif isinstance(event, PartData):
                    parts[-1][2] += event.data
                else:
                    assert isinstance(event, PartEnd)
        parser.close()
        assert [tuple(p) for p in parts] == expected, size


def test_file_store_through_a_pyarrow_uri(tmp_path):
    store = FileStore(f"file://{tmp_path}/bucket")
    assert store.put("f.jsonl", [b"ab", b"cd"]) == 4 and store.size("f.jsonl") == 4
    assert b"".join(store.iter_bytes("f.jsonl", chunk=3)) == b"abcd"
    with store.local_path("f.jsonl") as path:
        assert path.read_bytes() == b"abcd"

    def failing():
        yield b"partial"
        raise OSError("client went away")

    with pytest.raises(OSError):
        store.put("g.jsonl", failing())
    assert store.size("g.jsonl") is None  # nothing half-written is left
    store.delete("f.jsonl")
    store.delete("f.jsonl")
    assert store.size("f.jsonl") is None and list((tmp_path / "bucket").iterdir()) == []


def test_batches_over_a_remote_file_store(backend, redis_server, queue_engine):
    """A store that is not a local directory (pyarrow's in-memory mock filesystem, as S3 would
    be): the input is validated from a temporary local copy, the output written to the store."""
    api = make_api(backend, redis_server.url, "mock:///bucket")
    f = upload(api.client, [line("a"), line("b", url=CHAT)])
    failed = api.client.batches.create(input_file_id=f.id, endpoint=COMPLETIONS, completion_window="24h")
    assert [(e.line, e.code) for e in failed.errors.data] == [(2, "mismatched_endpoint")]
    f = upload(api.client, [line("a"), line("b")])
    batch = api.client.batches.create(input_file_id=f.id, endpoint=COMPLETIONS, completion_window="24h")
    run_worker(redis_server.url, queue_engine)
    batch = api.client.batches.retrieve(batch.id)
    assert [x["custom_id"] for x in read_lines(api.client, batch.output_file_id)] == ["a", "b"]
    store = api.service.files.store
    assert store.size(f"{batch.output_file_id}.jsonl") > 0


def client_for(api: SimpleNamespace, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url="http://testserver/v1", api_key=key, http_client=api.http, max_retries=0)


def test_a_later_short_window_is_leased_before_an_earlier_day(api, queue_store):
    f = upload(api.client, [line(f"r{i}") for i in range(3)])
    day = api.client.batches.create(input_file_id=f.id, endpoint=COMPLETIONS, completion_window="24h")
    short = api.client.batches.create(input_file_id=f.id, endpoint=COMPLETIONS, completion_window="30m")
    assert [lease.job_id for lease in queue_store.lease("w", 30, max_shards=4)] == [short.id, day.id]
    # the estimate rides along as an extension field the SDK keeps; no throughput yet: no eta
    got = api.client.batches.retrieve(short.id)
    assert got.model_extra["x_harvest"] == {"eta": None, "deadline": got.expires_at, "at_risk": False}
    assert got.expires_at - got.created_at == 1800


def test_the_eta_follows_recent_throughput(api, redis_server, queue_engine):
    one = upload(api.client, [line("warm-up")])
    api.client.batches.create(input_file_id=one.id, endpoint=COMPLETIONS, completion_window="24h")
    run_worker(redis_server.url, queue_engine)  # one result in the last minutes: at most 0.1 requests/s
    many = upload(api.client, [line(f"r{i}") for i in range(40)])
    short = api.client.batches.create(input_file_id=many.id, endpoint=COMPLETIONS, completion_window="5m")
    day = api.client.batches.create(input_file_id=many.id, endpoint=COMPLETIONS, completion_window="24h")
    short_eta, day_eta = short.model_extra["x_harvest"], day.model_extra["x_harvest"]
    assert short_eta["at_risk"] and short_eta["eta"] > short_eta["deadline"] == short.expires_at
    # the day batch waits behind the 5m one (80 requests ahead) and still makes its window
    assert not day_eta["at_risk"] and short_eta["eta"] < day_eta["eta"] <= day.expires_at


def test_reading_a_batch_recomputes_its_eta_from_the_work_left(api, queue_store):
    from harvest.queue import Result

    day = api.client.batches.create(
        input_file_id=upload(api.client, [line(f"d{i}") for i in range(4)]).id,
        endpoint=COMPLETIONS,
        completion_window="24h",
    )
    assert day.model_extra["x_harvest"]["eta"] is None  # created with no throughput to judge by
    (lease,) = queue_store.lease("w", 30)
    done = Result("completed", text="x", prompt_tokens=1, completion_tokens=1)
    assert queue_store.write_results(lease, {0: done, 1: done}) == ["ok", "ok"]
    # two results in one 10 s bucket: at most 0.2 requests/s, two requests left
    now = queue_store.now()
    fresh = api.client.batches.retrieve(day.id).model_extra["x_harvest"]
    assert fresh["eta"] >= int(now + 2 / 0.2) and not fresh["at_risk"]
    # a 5m batch of 80 is leased first: the day batch now waits behind it, which cannot make
    # its own window at this rate
    short = api.client.batches.create(
        input_file_id=upload(api.client, [line(f"s{i}") for i in range(80)]).id,
        endpoint=COMPLETIONS,
        completion_window="5m",
    )
    later = api.client.batches.retrieve(day.id).model_extra["x_harvest"]
    assert later["eta"] >= fresh["eta"] + 80 / 0.2 - 1 and not later["at_risk"]
    short_eta = api.client.batches.retrieve(short.id).model_extra["x_harvest"]
    assert short_eta["at_risk"] and short_eta["eta"] > short_eta["deadline"]
    # a list shows the estimate stored at creation
    listed = {b.id: b.model_extra["x_harvest"]["eta"] for b in api.client.batches.list()}
    assert listed[day.id] is None


def test_an_expired_window_keeps_the_finished_lines(api, redis_server, queue_engine, queue_store):
    lines = [line(f"short-{i}", max_tokens=1) for i in range(3)] + [line("long", max_tokens=64)]
    f = upload(api.client, lines)
    batch = api.client.batches.create(input_file_id=f.id, endpoint=COMPLETIONS, completion_window="1h")
    engine, stop = HeldEngine(queue_engine, free_steps=2), threading.Event()
    config = WorkerConfig(visibility_timeout_s=0.6)
    worker = threading.Thread(
        target=run_local, args=(queue_store, engine, config), kwargs={"stop": stop.is_set}
    )
    worker.start()
    try:
        wait_for(lambda: api.client.batches.retrieve(batch.id).request_counts.completed == 3)
        # the window passes (its deadline moved to now: a test cannot wait an hour)
        queue_store.r.zadd(f"{queue_store.prefix}:deadlines", {batch.id: 0})
        batch = wait_for(lambda: (b := api.client.batches.retrieve(batch.id)).status == "expired" and b)
    finally:
        stop.set()
        engine.release.set()
        worker.join(30)
    output, errors = read_lines(api.client, batch.output_file_id), read_lines(api.client, batch.error_file_id)
    assert [x["custom_id"] for x in output] == ["short-0", "short-1", "short-2"]
    assert [(x["custom_id"], x["error"]["code"]) for x in errors] == [("long", "batch_expired")]
    counts = batch.request_counts
    assert (counts.total, counts.completed, counts.failed) == (4, len(output), len(errors))
    assert queue_store.lease("w", 30) == []  # nothing of it is leased again


def test_two_keys_see_only_their_own(backend, redis_server, tmp_path, queue_engine):
    api = make_api(
        backend, redis_server.url, tmp_path / "files", api_key={"k-alice": "alice", "k-bob": "bob"}
    )
    alice, bob = client_for(api, "k-alice"), client_for(api, "k-bob")
    f = upload(alice, [line("a")])
    batch = alice.batches.create(input_file_id=f.id, endpoint=COMPLETIONS, completion_window="24h")
    run_worker(redis_server.url, queue_engine)
    batch = alice.batches.retrieve(batch.id)
    assert batch.status == "completed" and read_lines(alice, batch.output_file_id)[0]["custom_id"] == "a"

    assert bob.files.list().data == [] and bob.batches.list().data == []
    for call in (
        lambda: bob.files.retrieve(f.id),
        lambda: bob.files.content(f.id),
        lambda: bob.files.delete(f.id),
        lambda: bob.files.retrieve(batch.output_file_id),
        lambda: bob.batches.retrieve(batch.id),
        lambda: bob.batches.cancel(batch.id),
        lambda: bob.batches.create(input_file_id=f.id, endpoint=COMPLETIONS, completion_window="24h"),
    ):
        with pytest.raises(openai.NotFoundError):  # 404, as for an id that does not exist
            call()
    mine = upload(bob, [line("b")])
    assert [x.id for x in bob.files.list()] == [mine.id]
    assert bob.files.list(after=f.id, order="asc").data == []  # a cursor of alice's is no cursor
    assert sorted(x.id for x in alice.files.list()) == sorted([f.id, batch.output_file_id])
    assert "owner" not in alice.files.retrieve(f.id).model_extra  # the tenant is not shown
    with pytest.raises(openai.AuthenticationError):
        client_for(api, "k-eve").files.list()
    # the operator's view (HarvestClient, `harvest jobs`) keeps every tenant's
    jobs = HarvestClient(redis_server.url).list_jobs()
    assert [(job.id, job.owner) for job in jobs] == [(batch.id, "alice")]


def test_completion_windows_in_bounds(api):
    f = upload(api.client, [line("x")])
    for window, seconds in [("5m", 300), ("1h", 3600), ("2d", 172800), ("7d", 604800)]:
        batch = api.client.batches.create(input_file_id=f.id, endpoint=COMPLETIONS, completion_window=window)
        assert batch.expires_at - batch.created_at == seconds and batch.completion_window == window
    for window in ("4m", "8d", "90s", "1.5h", "24 h", "-1h", "forever"):
        with pytest.raises(openai.BadRequestError) as exc:
            api.client.batches.create(input_file_id=f.id, endpoint=COMPLETIONS, completion_window=window)
        assert exc.value.body["param"] == "completion_window" and "5m to 7d" in exc.value.body["message"]


def test_a_tenants_listing_reads_only_its_own_records(redis_server, tmp_path):
    """Per-tenant indexes: bob's page costs the same whether alice has 3 files or 300."""
    import redis as redis_lib

    from harvest.batch.files import FileRegistry

    r = redis_lib.Redis.from_url(redis_server.url, decode_responses=True)
    registry = FileRegistry(r, FileStore(tmp_path / "files"))

    def new_file(owner: str, purpose: str = "batch") -> str:
        upload = registry.start("x.jsonl", purpose, owner=owner)
        upload.write(b'{"custom_id": "a"}\n')
        return upload.commit().id

    def hgetalls() -> int:
        return int(r.info("commandstats").get("cmdstat_hgetall", {}).get("calls", 0))

    bobs = [new_file("bob"), new_file("bob", "batch_output")]
    for _ in range(300):
        new_file("alice")
    before = hgetalls()
    page, more = registry.list(tenant="bob")
    assert [f.id for f in page] == bobs[::-1] and not more
    assert registry.list(tenant="bob", purpose="batch_output")[0][0].id == bobs[1]
    assert hgetalls() - before == 4  # two pages of bob's two records; none of alice's 300
    assert len(registry.list(tenant="alice", limit=1000)[0]) == 300
    assert len(registry.list(limit=1000)[0]) == 302  # the operator's view: everyone's
    assert registry.delete(bobs[0], "bob") and [f.id for f in registry.list(tenant="bob")[0]] == [bobs[1]]
