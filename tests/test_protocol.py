"""The one request translator: every poison value is refused online (a 400 naming the
param) and offline (an error naming the item and the field), with the same verdict and
the same words on both paths."""

from __future__ import annotations

import json
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from harvest.protocol.errors import InvalidRequest
from harvest.protocol.requests import CHAT, COMPLETIONS, parse_body
from harvest.protocol.sampling_params import SamplingParams
from harvest.queue import InvalidInputError, JobStatus, RequestSpec, WorkerConfig, run_local
from harvest.queue.inputs import InputError, read_items
from tests.helpers import post_json, serve_app

MODEL = "tiny-llama"
USER = [{"role": "user", "content": "Tell me of the river."}]


@pytest.fixture(scope="module")
def api(tiny_model) -> Iterator[SimpleNamespace]:
    served = serve_app(tiny_model, MODEL)
    with TestClient(served.app) as client:
        served.client = client
        yield served
    served.loop.stop()


def post(client, url: str, body: dict[str, Any]) -> httpx.Response:
    return post_json(client, url, {"model": MODEL} | body)


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
    spec = offline_verdict(
        COMPLETIONS,
        {"prompt": "hi", "top_k": -1, "stop": None},
        {"temperature": 0, "top_k": 5, "stop": ["\n"]},
    )
    assert spec.params == {"temperature": 0, "top_k": 0, "stop": ["\n"]}  # null is "the default"
    with pytest.raises(InvalidInputError, match="job sampling defaults: Invalid value for 'temperature'"):
        offline_verdict(COMPLETIONS, {"prompt": "hi"}, {"temperature": 1e-9})


def test_python_ints_past_int64_are_refused_before_they_reach_a_shard():
    # json.dumps cannot write an int of more than 4,300 digits: it would fail writing the shard
    item = offline_verdict(COMPLETIONS, {"prompt": "hi", "max_tokens": 10**5000})
    assert isinstance(item, InputError) and item.reason.startswith("Invalid value for 'max_tokens'")


def test_unparseable_numbers_are_a_400_online(api):
    # a 5,001-digit number is valid JSON that Python will not parse (offline: that line's error)
    digits = json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 1}).replace("1}", "9" * 5001 + "}")
    r = api.client.post(COMPLETIONS, content=digits, headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


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


def test_parse_body_names_what_is_not_a_request():
    for url, body, param in [
        ("/v1/embeddings", {}, "url"),
        (COMPLETIONS, [1], "body"),
        (COMPLETIONS, {}, "prompt"),
    ]:
        with pytest.raises(InvalidRequest) as info:
            parse_body(url, body)
        assert info.value.param == param
