"""Flex tier: `service_tier: "flex"` runs an HTTP request in the offline class, on harvested capacity."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from types import SimpleNamespace

import openai
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from harvest.api import LocalBackend, build_app
from harvest.api.backend import BackendBusy
from harvest.engine import RequestClass, SamplingParams
from harvest.serving import EngineLoop
from tests.helpers import make_engine, make_prompts, uvicorn_server

MODEL = "tiny-llama"
MESSAGES = [{"role": "user", "content": "Tell me of the river."}]
GREEDY = {"model": MODEL, "max_tokens": 8, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def flex(tiny_model) -> Iterator[SimpleNamespace]:
    loop = EngineLoop(make_engine(tiny_model, max_num_seqs=8, max_model_len=256))
    backend = LocalBackend(loop, MODEL)
    with TestClient(build_app(backend)) as client:
        yield SimpleNamespace(loop=loop, backend=backend, client=client)
    loop.stop()


def e2e_counts(client: TestClient) -> dict[str, float]:
    """Finished requests by class, as /metrics reports them."""
    text = client.get("/metrics").text
    return {
        s.labels["class"]: s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "harvest_request_e2e_seconds_count"
    }


def test_flex_completion_runs_offline_and_echoes_its_tier(flex):
    before = e2e_counts(flex.client)
    r = flex.client.post("/v1/completions", json={"prompt": "The miller", "service_tier": "flex", **GREEDY})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["service_tier"] == "flex" and body["usage"]["completion_tokens"] == 8
    after = e2e_counts(flex.client)
    assert after["offline"] == before["offline"] + 1  # the engine ran it in the offline class
    assert after["online"] == before["online"]  # and the online histograms never saw it
    online = flex.client.post("/v1/completions", json={"prompt": "The miller", **GREEDY}).json()
    assert online["service_tier"] == "default"
    assert online["choices"][0]["text"] == body["choices"][0]["text"]  # same model, same greedy answer
    assert e2e_counts(flex.client)["online"] == before["online"] + 1


def test_flex_chat_streams_with_its_tier_on_every_chunk(flex):
    body = {"messages": MESSAGES, "service_tier": "flex", "stream": True,
            "stream_options": {"include_usage": True}, **GREEDY}  # fmt: skip
    r = flex.client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200
    lines = [line.removeprefix("data: ") for line in r.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(line) for line in lines[:-1]]
    assert all(c["service_tier"] == "flex" for c in chunks)
    assert chunks[-1]["usage"]["completion_tokens"] == 8
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"


@pytest.mark.parametrize("tier", ["auto", "default", None])
def test_other_tiers_stay_online(flex, tier):
    r = flex.client.post("/v1/completions", json={"prompt": "hi", "service_tier": tier, **GREEDY})
    assert r.status_code == 200 and r.json()["service_tier"] == "default"


@pytest.mark.parametrize("tier", ["priority", "scale", 1, "FLEX"])
def test_unknown_tier_is_a_400_naming_the_field(flex, tier):
    r = flex.client.post("/v1/chat/completions", json={"messages": MESSAGES, "service_tier": tier, **GREEDY})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "service_tier"


def test_the_openai_sdk_sends_flex(flex):
    with uvicorn_server(build_app(flex.backend)) as base_url:
        client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)
        args = {"model": MODEL, "max_tokens": 6, "temperature": 0}
        # the SDK's legacy completions take no service_tier: it travels in the body all the same
        extra = {"ignore_eos": True, "service_tier": "flex"}
        done = client.completions.create(prompt="The miller", extra_body=extra, **args)
        args["service_tier"] = "flex"
        reply = client.chat.completions.create(messages=MESSAGES, **args)
        chunks = list(client.chat.completions.create(messages=MESSAGES, stream=True, **args))
    assert done.usage.completion_tokens == 6 and done.model_extra["service_tier"] == "flex"
    assert reply.service_tier == "flex" and reply.choices[0].message.content
    assert {c.service_tier for c in chunks} == {"flex"}
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == reply.choices[0].message.content


def test_a_flex_request_goes_ahead_of_a_batch_backlog(flex):
    """Four waves of batch lines are in the engine (8 seats): the flex request takes the
    first seat that comes free and finishes before the second wave does."""
    [prompt] = make_prompts(flex.loop.engine, [9], start=300)
    backlog, done, all_done = 32, [], threading.Event()

    def on_output(out) -> None:
        if out.finished:
            done.append(out.request_id)
            if len(done) == backlog:
                all_done.set()

    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    ids = [
        flex.loop.submit(prompt, params, f"batch-{i}", RequestClass.OFFLINE, on_output)
        for i in range(backlog)
    ]
    try:
        r = flex.client.post("/v1/completions", json={"prompt": prompt, "service_tier": "flex", **GREEDY})
        finished_before = len(done)
    finally:
        for rid in ids:
            flex.loop.abort(rid)
        assert all_done.wait(60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8
    assert finished_before <= 8, f"{finished_before} batch lines finished before the flex request"


# ---------------------------------------------------------------------- the backend's queues


async def drain(stream) -> list:
    return [out async for out in stream]


def test_flex_and_online_queues_do_not_refuse_each_other(tiny_model):
    loop = EngineLoop(make_engine(tiny_model, max_num_seqs=8, max_model_len=256))
    backend = LocalBackend(loop, MODEL, max_pending=1, max_pending_flex=1)
    [prompt] = make_prompts(loop.engine, [9])
    long = SamplingParams(max_tokens=120, temperature=0, ignore_eos=True)
    short = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)

    async def scenario() -> None:
        online = backend.generate(prompt, long, "online-1")
        await anext(online)  # the online queue is full now
        with pytest.raises(BackendBusy):
            await anext(backend.generate(prompt, short, "online-2"))
        flex_outputs = await drain(backend.generate(prompt, short, "flex-1", RequestClass.OFFLINE))
        assert flex_outputs[-1].finished and flex_outputs[-1].num_output_tokens == 4
        assert flex_outputs[-1].request_class is RequestClass.OFFLINE
        # a flex backlog, in turn, leaves the online queue alone
        await online.aclose()
        flex = backend.generate(prompt, long, "flex-2", RequestClass.OFFLINE)
        await anext(flex)
        with pytest.raises(BackendBusy, match="flex"):
            await anext(backend.generate(prompt, short, "flex-3", RequestClass.OFFLINE))
        online_outputs = await drain(backend.generate(prompt, short, "online-3"))
        assert online_outputs[-1].num_output_tokens == 4
        await flex.aclose()
        assert backend.flex_pending == 0

    try:
        asyncio.run(asyncio.wait_for(scenario(), 120))
    finally:
        loop.stop()


def test_flex_completes_next_to_online_load_with_the_greedy_answer(tiny_model):
    # a small KV pool, so that online requests must evict the flex one on the way in
    loop = EngineLoop(make_engine(tiny_model, max_num_seqs=4, max_model_len=256, num_blocks=48))
    backend = LocalBackend(loop, MODEL)
    prompts = make_prompts(loop.engine, [30, 25, 20, 15, 10])
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)

    async def scenario() -> tuple[list, list]:
        alone = await drain(backend.generate(prompts[0], params, "alone"))
        flex_stream = backend.generate(prompts[0], params, "flex", RequestClass.OFFLINE)
        first = await anext(flex_stream)  # running, holding its blocks, when the online ones arrive
        online = [drain(backend.generate(p, params, f"online-{i}")) for i, p in enumerate(prompts[1:])]
        flex, *online = await asyncio.gather(drain(flex_stream), *online)
        return alone, [[first, *flex], *online]

    try:
        alone, (flex, *online) = asyncio.run(asyncio.wait_for(scenario(), 120))
    finally:
        loop.stop()
    assert all(o[-1].finished and o[-1].num_output_tokens == 24 for o in online)
    assert flex[-1].num_preemptions >= 1  # evicted for the online requests, and recomputed
    assert flex[-1].finish_reason.value == "length" and flex[-1].token_ids == alone[-1].token_ids


def test_flex_latencies_stay_out_of_the_workers_slo_feedback(tiny_model):
    from actors.gpu_worker import WorkerBackend

    engine = make_engine(tiny_model, max_num_seqs=4, max_model_len=256)
    observed: list[tuple] = []
    worker = SimpleNamespace(engine=engine, loop=EngineLoop(engine), observe=lambda *a: observed.append(a))
    backend = WorkerBackend(worker, MODEL)
    [prompt] = make_prompts(engine, [9])
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)

    async def scenario() -> None:
        await drain(backend.generate(prompt, params, "flex", RequestClass.OFFLINE))
        assert observed == []
        await drain(backend.generate(prompt, params, "online"))

    try:
        asyncio.run(asyncio.wait_for(scenario(), 60))
    finally:
        worker.loop.stop()
    [(ttft_s, decode_s, tokens)] = observed  # the online request alone
    assert tokens == 4 and ttft_s > 0 and decode_s > 0
