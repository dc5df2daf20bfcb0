"""End to end on a local Ray: controller, two worker replicas behind HAProxy, real Redis, tiny model."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import openai
import pytest
import ray
from typer.testing import CliRunner

from harvest import service
from harvest.cli import app
from harvest.client import HarvestClient
from harvest.engine import Engine, SamplingParams
from harvest.local_redis import free_port
from tests.conftest import RedisServer
from tests.helpers import wait_healthy

MODEL_NAME = "tiny"


@pytest.fixture(scope="module")
def svc(tiny_model, tmp_path_factory, ray_cluster):
    redis_server = RedisServer(tmp_path_factory.mktemp("svc-redis"))
    redis_server.start()
    port = free_port()
    config = service.ServiceConfig(
        model=str(tiny_model),
        redis_url=redis_server.url,
        model_name=MODEL_NAME,
        num_workers=2,
        port=port,
        engine_options={"profile_latency": False, "block_size": 16},
        files_uri=str(tmp_path_factory.mktemp("svc-files")),  # Batch API files: not the runner's data dir
        queue_options={
            "visibility_timeout_s": 5,
            "progress_interval_s": 0.1,
            "max_shards": 2,
            "idle_poll_s": 0.05,
        },
    )
    service.start(config)
    base = f"http://127.0.0.1:{port}"
    wait_healthy(base)
    yield {"base": base, "redis": redis_server, "model": tiny_model}
    service.stop()
    redis_server.stop()


@pytest.fixture(scope="module")
def oai(svc):
    return openai.OpenAI(base_url=f"{svc['base']}/v1", api_key="unused")


@pytest.fixture(scope="module")
def reference(tiny_model):
    return Engine.from_pretrained(str(tiny_model), profile_latency=False)


def test_completions_match_the_engine_with_usage(oai, reference):
    prompt = "The miller listened to the water"
    resp = oai.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=12, temperature=0)
    ids = reference.tokenizer.encode(prompt)
    expected = reference.generate([ids], SamplingParams(max_tokens=12, temperature=0))[0]
    assert resp.usage.prompt_tokens == len(ids)
    assert resp.usage.completion_tokens == expected.num_output_tokens
    assert resp.choices[0].text == expected.text  # greedy over HTTP == the engine's own


def test_streaming_chat_with_usage(oai):
    messages = [{"role": "user", "content": "Tell me about bread."}]
    full = oai.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=10, temperature=0)
    chunks = list(
        oai.chat.completions.create(
            model=MODEL_NAME,
            messages=messages,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens > 5


def test_bad_input_gets_4xx_and_service_keeps_serving(svc, oai):
    base = svc["base"]
    r = httpx.post(
        f"{base}/v1/completions", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(f"{base}/v1/completions", json={"model": MODEL_NAME, "prompt": "x", "max_tokens": -1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    r = httpx.post(f"{base}/v1/completions", json={"model": "nope", "prompt": "x"})
    assert r.status_code == 404
    r = httpx.post(f"{base}/v1/completions", json={"model": MODEL_NAME, "prompt": "x " * 5000})
    assert r.status_code == 400
    assert (
        oai.completions.create(model=MODEL_NAME, prompt="still here", max_tokens=2).usage.completion_tokens
        == 2
    )


def wait_job(client: HarvestClient, job_id: str, timeout: float = 120):
    job = client.wait(job_id, timeout=timeout, progress=False)
    assert job.status.value == "completed", job
    return job


def test_offline_job_completes_while_online_is_served_by_both_workers(svc, oai):
    client = HarvestClient(svc["redis"].url)
    prompts = [f"Review number {i}: the soup was" for i in range(40)]
    job = client.submit(prompts, model=MODEL_NAME, max_tokens=24, temperature=0, shard_size=4)
    online = [
        oai.completions.create(
            model=MODEL_NAME, prompt=f"online {i}", max_tokens=8, extra_body={"ignore_eos": True}
        )
        for i in range(6)
    ]
    assert all(r.usage.completion_tokens == 8 for r in online)
    wait_job(client, job.id)
    rows = client.results(job.id).to_pylist()
    assert sorted(r["custom_id"] for r in rows) == sorted({r["custom_id"] for r in rows})
    assert len(rows) == 40 and all(r["error_code"] is None for r in rows)
    assert len({r["worker"] for r in rows}) == 2  # both workers took shards of the one job
    status = service.status()
    assert len(status["workers"]) == 2 and all(s["healthy"] for s in status["workers"].values())


def test_a_poison_batch_line_costs_its_own_record_and_health_never_fails(svc, oai):
    """Lines the submit-time checks cannot judge (a token id past the model's embeddings, known
    only where the model is) end with their own error record; the good lines of the job
    complete, and the workers answer /health 200 throughout."""
    client = HarvestClient(svc["redis"].url)
    good = [f"Ticket {i}: the bread was late" for i in range(12)]
    poison = [
        {"custom_id": "poison-id", "url": "/v1/completions", "body": {"prompt": [5, 10**6], "max_tokens": 4}},
        {
            "custom_id": "poison-stop-id",
            "url": "/v1/completions",
            "body": {"prompt": "x", "max_tokens": 4, "stop_token_ids": [2**40]},
        },
    ]
    health: list[tuple[int, float]] = []
    done = threading.Event()

    def probe() -> None:
        with httpx.Client(base_url=svc["base"], timeout=10) as http:
            while not done.is_set():
                start = time.monotonic()
                health.append((http.get("/health").status_code, time.monotonic() - start))
                time.sleep(0.05)

    prober = threading.Thread(target=probe, daemon=True)
    prober.start()
    try:
        job = client.submit([*good[:6], *poison, *good[6:]], model=MODEL_NAME, max_tokens=16, shard_size=4)
        finished = client.wait(job.id, timeout=120, progress=False)
    finally:
        done.set()
        prober.join(timeout=30)
    rows = {r["custom_id"]: r for r in client.results(job.id).to_pylist()}
    assert finished.request_counts.completed == 12 and finished.request_counts.failed == 2
    assert {rows[c]["error_code"] for c in ("poison-id", "poison-stop-id")} == {"invalid_request"}
    assert all(rows[f"request-{i}"]["error_code"] is None for i in (*range(6), *range(8, 14)))
    assert health and all(code == 200 for code, _ in health), health
    assert oai.completions.create(model=MODEL_NAME, prompt="still here", max_tokens=2).usage.completion_tokens


def test_a_batch_through_the_openai_client_agrees_with_harvest_results(svc, oai, tmp_path):
    """Upload, create, poll and download with the openai client against the service's workers;
    the batch's output and error files hold exactly the lines `harvest results` exports for the
    same job (a batch id is its job's id)."""

    def batch_line(custom_id: str, prompt: str | list[int]) -> dict:
        body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": 6, "temperature": 0, "ignore_eos": True}
        return {"custom_id": custom_id, "method": "POST", "url": "/v1/completions", "body": body}

    lines = [batch_line(f"b-{i}", f"Batch line {i}: the miller said") for i in range(6)]
    lines.append(batch_line("b-poison", [5, 10**6]))  # a token id past the model's: its own error line
    data = "".join(json.dumps(x) + "\n" for x in lines).encode()
    uploaded = oai.files.create(file=("lines.jsonl", data), purpose="batch")
    batch = oai.batches.create(input_file_id=uploaded.id, endpoint="/v1/completions", completion_window="1h")
    deadline = time.monotonic() + 120
    while batch.status not in ("completed", "failed", "expired", "cancelled"):
        assert time.monotonic() < deadline, batch
        time.sleep(0.1)  # polling, as a batch client does
        batch = oai.batches.retrieve(batch.id)
    assert batch.status == "completed", batch
    assert (batch.request_counts.completed, batch.request_counts.failed) == (6, 1)
    output = oai.files.content(batch.output_file_id).text.splitlines()
    errors = oai.files.content(batch.error_file_id).text.splitlines()

    exported = tmp_path / "out.jsonl"
    result = CliRunner().invoke(
        app, ["results", batch.id, "-o", str(exported), "--redis-url", svc["redis"].url]
    )
    assert result.exit_code == 0, result.output
    assert output == exported.read_text().splitlines()
    assert errors == (tmp_path / "out.errors.jsonl").read_text().splitlines()
    answers = {x["custom_id"]: x["response"]["body"] for x in map(json.loads, output)}
    assert sorted(answers) == [f"b-{i}" for i in range(6)]
    assert all(a["usage"]["completion_tokens"] == 6 for a in answers.values())
    assert json.loads(errors[0])["error"]["code"] == "invalid_request"


def test_one_scrape_sees_every_worker_and_the_offline_queue(svc, oai):
    from prometheus_client.parser import text_string_to_metric_families

    def scrape() -> tuple[dict, list]:
        text = httpx.get(f"{svc['base']}/metrics").text
        families = {f.name: f for f in text_string_to_metric_families(text)}
        samples = families["harvest_request_ttft_seconds"].samples
        return families, [s for s in samples if s.name.endswith("_count") and s.labels["class"] == "online"]

    before = sum(s.value for s in scrape()[1])
    exact = {"ignore_eos": True}
    for _ in range(3):
        oai.completions.create(model=MODEL_NAME, prompt="count", max_tokens=4, extra_body=exact)
    deadline = time.monotonic() + 30
    while True:  # the controller's view catches up with the next heartbeat (4 a second)
        families, ttft = scrape()
        if sum(s.value for s in ttft) >= before + 3 or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    # `before` may miss the previous test's last request (a heartbeat behind): hence >=
    assert sum(s.value for s in ttft) >= before + 3
    assert {s.labels["worker"] for s in ttft} == set(service.status()["workers"])  # every worker, one scrape
    assert families["harvest_offline_requests_pending"].samples[0].value >= 0
    assert "harvest_job_requests" in families


def test_workers_keep_their_start_up_heap_out_of_full_collections(svc):
    for name, stats in service.status()["workers"].items():
        # torch, transformers, Ray and the model: some 10^5 objects no full GC should walk
        assert stats["gc_frozen_objects"] > 100_000, name


def test_workers_tighten_engine_targets_when_their_clients_see_misses(svc, oai):
    controller = service.controller_handle()
    assert ray.get(controller.set_slo.remote(0.001, 0.0001))  # every worker took it; no request can meet it
    try:
        deadline = time.monotonic() + 60
        while True:
            for i in range(4):
                oai.completions.create(
                    model=MODEL_NAME, prompt=f"slo {i}", max_tokens=4, extra_body={"ignore_eos": True}
                )
            # the engine now plans for a share of the SLO; the status shows which
            engine_slo = {n: s["slo"] for n, s in service.status()["workers"].items()}
            tightened = [n for n, slo in engine_slo.items() if slo["tpot_s"] < 0.0001]
            if tightened:
                break
            assert time.monotonic() < deadline, "no worker's targets were tightened"
        assert engine_slo[tightened[0]]["ttft_s"] < 0.001
        assert service.status()["workers"][tightened[0]]["slo_scale"] < 1.0
    finally:
        assert ray.get(controller.set_slo.remote(10.0, 1.0))


def _busy_worker(job_id: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, s in service.status()["workers"].items():
            if any(k.startswith(job_id) for k in s.get("shards", [])):
                return name
        time.sleep(0.05)
    raise AssertionError("no worker leased a shard")


@pytest.mark.parametrize("how", ["ray.kill", "SIGKILL"])
def test_worker_killed_mid_shard_job_still_completes_exactly_once(svc, how):
    from actors.checkpoint_keeper import keeper_for_this_node

    keeper = keeper_for_this_node()[1]  # one node here: the workers' keeper
    shipped = ray.get(keeper.stats.remote())["bytes_put"]
    client = HarvestClient(svc["redis"].url)
    job = client.submit(
        [f"long story {i}" for i in range(16)],
        model=MODEL_NAME,
        max_tokens=600,
        temperature=0,
        shard_size=8,
        defaults={"ignore_eos": True},
    )
    victim = _busy_worker(job.id)
    time.sleep(0.3)  # let it make progress, and record some
    deadline = time.monotonic() + 30
    while ray.get(keeper.stats.remote())["bytes_put"] == shipped:  # and ship checkpoints (every 0.25 s)
        assert time.monotonic() < deadline, "no checkpoint reached the keeper"
        time.sleep(0.05)
    stats = service.status()["workers"][victim]
    assert any(k.startswith(job.id) for k in stats["shards"]), "finished too soon"
    if how == "ray.kill":  # the worker's Serve replica
        ray.kill(ray.get_actor(stats["actor_name"], namespace="serve"), no_restart=True)
    else:
        os.kill(stats["pid"], signal.SIGKILL)
    wait_job(client, job.id, timeout=180)
    rows = client.results(job.id).to_pylist()
    assert len(rows) == 16 and len({r["custom_id"] for r in rows}) == 16
    assert all(r["error_code"] is None and r["completion_tokens"] == 600 for r in rows), [
        (r["error_code"], r.get("error_message"), r["completion_tokens"]) for r in rows
    ]
    assert any(r["resumed_tokens"] > 0 for r in rows)  # picked up from recorded progress, not from scratch
    restored = sum(s["totals"]["restored_tokens"] for s in service.status()["workers"].values())
    assert restored > 0  # ... and from the dead worker's KV checkpoints, kept by the node's keeper
    deadline = time.monotonic() + 60  # the controller saw the death; Serve replaced the replica
    while not any(d["worker"] == victim for d in service.status()["deaths"]):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    while len([s for s in service.status()["workers"].values() if s["healthy"]]) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.2)


def test_controller_restart_keeps_serving(svc, oai):
    controller = service.controller_handle()
    ray.kill(controller, no_restart=False)
    assert oai.completions.create(
        model=MODEL_NAME, prompt="during restart", max_tokens=3
    ).usage.completion_tokens
    client = HarvestClient(svc["redis"].url)
    job = client.submit(
        [f"after restart {i}" for i in range(8)], model=MODEL_NAME, max_tokens=8, shard_size=4
    )
    wait_job(client, job.id)
    deadline = time.monotonic() + 60
    while True:
        try:
            status = service.status()
            if len(status["workers"]) == 2:
                break
        except ray.exceptions.RayError:
            pass
        assert time.monotonic() < deadline
        time.sleep(0.2)
