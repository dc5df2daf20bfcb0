"""The OpenAI-compatible app over a real engine (tiny model): shapes, streaming, errors, aborts."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import httpx
import openai
import pytest
from fastapi.testclient import TestClient

from harvest.api import Backend, LocalBackend, build_app
from harvest.engine import Engine, FinishReason, RequestOutput, SamplingParams
from harvest.engine.detokenizer import Detokenizer
from harvest.serving import EngineLoop
from tests.helpers import make_engine, uvicorn_server

MODEL = "tiny-llama"
KEY = "sk-test-key"
MAX_MODEL_LEN = 256
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me of the river."}]


class FinishedOutputs:
    """An `on_step` hook collecting finished outputs, with a blocking wait for a condition."""

    def __init__(self) -> None:
        self.outputs: list[RequestOutput] = []
        self.cond = threading.Condition()

    def __call__(self, outputs: list[RequestOutput]) -> None:
        with self.cond:
            self.outputs += [o for o in outputs if o.finished]
            self.cond.notify_all()

    def wait_for(
        self, pred: Callable[[RequestOutput], bool], count: int = 1, timeout: float = 30
    ) -> RequestOutput:
        """The `count`-th finished output that satisfies `pred`, once there is one."""
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.matching(pred)) >= count, timeout)
            return self.matching(pred)[count - 1]

    def matching(self, pred: Callable[[RequestOutput], bool]) -> list[RequestOutput]:
        return [o for o in self.outputs if pred(o)]


def serve(tiny_model, api_key: str | None = None, max_pending: int | None = None,
          **engine_kwargs) -> SimpleNamespace:  # fmt: skip
    engine = make_engine(tiny_model, max_num_seqs=8, **engine_kwargs)
    finished = FinishedOutputs()
    loop = EngineLoop(engine, on_step=finished)
    app = build_app(LocalBackend(loop, MODEL, max_pending=max_pending), api_key=api_key)
    return SimpleNamespace(engine=engine, loop=loop, finished=finished, app=app)


@pytest.fixture(scope="module")
def reference(tiny_model) -> Engine:
    """A second engine on the same weights: `Engine.generate` is the ground truth."""
    return make_engine(tiny_model)


@pytest.fixture(scope="module")
def api(tiny_model) -> Iterator[SimpleNamespace]:
    served = serve(tiny_model, max_model_len=MAX_MODEL_LEN)
    with TestClient(served.app) as client:
        served.client = client
        yield served
    served.loop.stop()


def expected_text(reference: Engine, prompt: str | list[int], params: SamplingParams) -> tuple[str, int]:
    """`Engine.generate`'s tokens, as the streaming detokenizer renders them, and their count.

    The HTTP path always detokenizes incrementally, which holds back an incomplete UTF-8
    tail that a one-shot decode would print as U+FFFD, so compare on the same rendering.
    """
    out = reference.generate([prompt], params)[0]
    prompt_ids = reference.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
    detok = Detokenizer(reference.tokenizer, prompt_ids=prompt_ids)  # as the engine decodes it
    for token in out.token_ids:
        detok.push(token)
    detok.flush()
    return detok.text, out.num_output_tokens


def chat_prompt_ids(tokenizer) -> list[int]:
    text = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def sse_events(text: str) -> list[Any]:
    events = []
    for block in text.split("\n\n"):
        if block:
            assert block.startswith("data: "), block
            data = block.removeprefix("data: ")
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def completion(client, **body) -> httpx.Response:
    return client.post("/v1/completions", json={"model": MODEL, **body})


def chat(client, **body) -> httpx.Response:
    return client.post("/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES, **body})


# ---------------------------------------------------------------------- completions


def test_completion_equals_engine_generate(api, reference):
    prompt = "The miller walked down to the river"
    text, n_out = expected_text(reference, prompt, SamplingParams(max_tokens=12, temperature=0))
    r = completion(api.client, prompt=prompt, max_tokens=12, temperature=0)
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"id", "object", "created", "model", "choices", "usage", "system_fingerprint",
                         "service_tier"}  # fmt: skip
    assert body["service_tier"] == "default"
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion"
    assert body["model"] == MODEL and isinstance(body["created"], int)
    assert body["choices"] == [{"index": 0, "text": text, "logprobs": None,
                                "finish_reason": body["choices"][0]["finish_reason"]}]  # fmt: skip
    n_prompt = len(reference.tokenizer.encode(prompt))
    assert body["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": n_out,
                             "total_tokens": n_prompt + n_out}  # fmt: skip


def test_prompt_forms_agree(api):
    prompt = "Once upon a time"
    ids = api.engine.tokenizer.encode(prompt)
    texts = set()
    for form in (prompt, [prompt], ids, [ids]):
        r = completion(api.client, prompt=form, max_tokens=6, temperature=0)
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == len(ids)
        texts.add(r.json()["choices"][0]["text"])
    assert len(texts) == 1


def test_streamed_completion_equals_non_streamed(api):
    args = {"prompt": "a b c", "max_tokens": 10, "temperature": 0, "ignore_eos": True}
    whole = completion(api.client, **args).json()
    r = completion(api.client, **args, stream=True, stream_options={"include_usage": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks, usage_chunk = events[:-2], events[-2]
    assert all(c["id"] == chunks[0]["id"] and c["object"] == "text_completion" for c in chunks)
    assert all(c["usage"] is None for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == whole["usage"]
    assert whole["usage"]["completion_tokens"] == 10

    plain = sse_events(completion(api.client, **args, stream=True).text)
    assert all("usage" not in c for c in plain[:-1])  # usage only when asked for


def test_stop_strings(api):
    free = completion(api.client, prompt="The river", max_tokens=16, temperature=0, ignore_eos=True)
    text = free.json()["choices"][0]["text"]
    stop = text[6:9]
    want = text[: text.index(stop)]
    for stop_field in (stop, [stop, "never-in-the-output"]):
        r = completion(api.client, prompt="The river", max_tokens=16, temperature=0, stop=stop_field)
        choice = r.json()["choices"][0]
        assert (choice["text"], choice["finish_reason"]) == (want, "stop")
    streamed = sse_events(completion(api.client, prompt="The river", max_tokens=16, temperature=0,
                                     stop=stop, stream=True).text)  # fmt: skip
    assert "".join(c["choices"][0]["text"] for c in streamed[:-1]) == want


# ---------------------------------------------------------------------- chat


def test_chat_completion_counts_the_templated_prompt(api, reference):
    ids = chat_prompt_ids(api.engine.tokenizer)
    text, n_out = expected_text(reference, ids, SamplingParams(max_tokens=9, temperature=0))
    r = chat(api.client, max_tokens=9, temperature=0)
    assert r.status_code == 200
    body = r.json()
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["message"]["content"] == text
    assert choice["logprobs"] is None and choice["index"] == 0
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": n_out,
                             "total_tokens": len(ids) + n_out}  # fmt: skip


def test_chat_stream_chunks(api):
    whole = chat(api.client, max_completion_tokens=7, temperature=0, ignore_eos=True).json()
    assert whole["usage"]["completion_tokens"] == 7  # max_completion_tokens took effect
    r = chat(api.client, max_completion_tokens=7, temperature=0, ignore_eos=True, stream=True,
             stream_options={"include_usage": True})  # fmt: skip
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks, usage_chunk = events[:-2], events[-2]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert content == whole["choices"][0]["message"]["content"]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == whole["usage"]


def test_models_health_and_metrics(api):
    assert isinstance(LocalBackend(api.loop, MODEL), Backend)  # the protocol the Serve app implements too
    models = api.client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == [MODEL]
    assert models["data"][0]["object"] == "model"
    assert api.client.get("/health").status_code == 200
    completion(api.client, prompt="count me", max_tokens=3, ignore_eos=True)
    r = api.client.get("/metrics")
    assert r.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    samples = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
               for line in r.text.splitlines() if line and not line.startswith("#")}  # fmt: skip
    assert samples[f'harvest_engine_steps_total{{worker="{MODEL}"}}'] >= 3
    assert samples[f'harvest_engine_generated_tokens_total{{class="online",worker="{MODEL}"}}'] >= 3
    assert samples[f'harvest_engine_requests_finished_total{{reason="length",worker="{MODEL}"}}'] >= 1
    assert samples[f'harvest_engine_healthy{{worker="{MODEL}"}}'] == 1


# ---------------------------------------------------------------------- errors

LONG_PROMPT = "the river " * MAX_MODEL_LEN  # far more than MAX_MODEL_LEN tokens
BAD_REQUESTS = [
    # (path, body, status, param, code)
    ("completions", "{not json", 400, None, None),
    ("completions", "[1, 2]", 400, None, None),
    ("completions", {"prompt": "hi"}, 400, "model", None),
    ("completions", {"model": MODEL}, 400, "prompt", None),
    ("chat/completions", {"model": MODEL}, 400, "messages", None),
    ("completions", {"model": MODEL, "prompt": "hi", "max_tokens": "5"}, 400, "max_tokens", None),
    ("completions", {"model": MODEL, "prompt": "hi", "temperature": "hot"}, 400, "temperature", None),
    ("completions", {"model": MODEL, "prompt": "hi", "temperature": 3}, 400, "temperature", None),
    ("completions", {"model": MODEL, "prompt": "hi", "max_tokens": 0}, 400, "max_tokens", None),
    ("completions", {"model": MODEL, "prompt": "hi", "max_tokens": -4}, 400, "max_tokens", None),
    ("completions", {"model": MODEL, "prompt": "hi", "max_tokens": MAX_MODEL_LEN}, 400, "max_tokens", None),
    ("completions", {"model": MODEL, "prompt": LONG_PROMPT}, 400, "prompt", "context_length_exceeded"),
    ("completions", {"model": MODEL, "prompt": ["a", "b"]}, 400, "prompt", None),
    ("completions", {"model": MODEL, "prompt": [1, 10**6]}, 400, "prompt", None),
    ("completions", {"model": MODEL, "prompt": "hi", "n": 2}, 400, "n", None),
    ("completions", {"model": MODEL, "prompt": "hi", "echo": True}, 400, "echo", None),
    ("completions", {"model": MODEL, "prompt": "hi", "logprobs": 1}, 400, "logprobs", None),
    ("completions", {"model": MODEL, "prompt": "hi", "stop": [""]}, 400, "stop", None),
    ("completions", {"model": MODEL, "prompt": "hi", "stream_options": {"include_usage": True}}, 400,
     "stream_options", None),
    ("completions", {"model": "no-such-model", "prompt": "hi"}, 404, "model", "model_not_found"),
    # "tool" is a role like the others now (offline always took it), if the template does
    ("chat/completions", {"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}, 400,
     "messages[0].role", None),
    ("chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": 5}]}, 400,
     "messages[0].content", None),
    ("chat/completions", {"model": MODEL, "messages": MESSAGES, "max_completion_tokens": MAX_MODEL_LEN}, 400,
     "max_completion_tokens", None),
    ("chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": LONG_PROMPT}]}, 400,
     "messages", "context_length_exceeded"),
    ("chat/completions", {"model": MODEL, "messages": MESSAGES, "logprobs": True}, 400, "logprobs", None),
]  # fmt: skip


@pytest.mark.parametrize(("path", "body", "status", "param", "code"), BAD_REQUESTS)
def test_bad_requests_get_openai_errors(api, path, body, status, param, code):
    content = body if isinstance(body, str) else json.dumps(body)
    r = api.client.post(f"/v1/{path}", content=content, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, code)
    assert completion(api.client, prompt="still here", max_tokens=1).status_code == 200


def test_unknown_route_is_an_openai_error(api):
    r = api.client.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"


def test_api_key(tiny_model):
    served = serve(tiny_model, api_key=KEY)
    try:
        with TestClient(served.app) as client:
            body = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
                r = client.post("/v1/completions", json=body, headers=headers)
                assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            r = client.post("/v1/completions", content="{bad", headers={"content-type": "application/json"})
            assert r.status_code == 401  # the key is checked before the body is parsed
            assert client.get("/v1/models").status_code == 401
            ok = client.post("/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
            assert ok.status_code == 200
            assert client.get("/health").status_code == 200 and client.get("/metrics").status_code == 200
    finally:
        served.loop.stop()


def test_stopped_loop_means_unhealthy_and_503(tiny_model):
    served = serve(tiny_model)
    with TestClient(served.app) as client:
        assert client.get("/health").status_code == 200
        served.loop.stop()
        health = client.get("/health")
        assert health.status_code == 503 and health.json()["error"]["type"] == "server_error"
        r = client.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 503 and "stopped" in r.json()["error"]["message"]
        r = client.post("/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES, "stream": True})
        assert r.status_code == 503  # refused before any stream starts
        assert "harvest_engine_healthy" in client.get("/metrics").text


def test_full_backend_answers_429_with_retry_after(tiny_model):
    # a full queue is back-pressure, not an outage: 429 (which the OpenAI SDKs retry), not 503
    served = serve(tiny_model, max_pending=0)
    with TestClient(served.app) as client:
        r = client.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 429 and "too many" in r.json()["error"]["message"]
        assert r.json()["error"]["code"] == "rate_limit_exceeded" and int(r.headers["Retry-After"]) >= 1
        assert client.get("/health").status_code == 200  # full is not unhealthy
    served.loop.stop()


def test_engine_dying_mid_stream_ends_the_stream_with_an_error_event(tiny_model):
    served = serve(tiny_model)
    forwards = 0

    def fail_from_fifth_forward(module, args) -> None:
        # a device that stays lost: a fault that fails once is blamed on its request instead
        nonlocal forwards
        forwards += 1
        if forwards >= 5:
            raise RuntimeError("device lost")

    layer = served.engine.runner.model.model.layers[0]
    handle = layer.register_forward_pre_hook(fail_from_fifth_forward)
    try:
        with TestClient(served.app) as client:
            # greedy: sampled tokens may all be pieces of one character, i.e. no text yet
            r = completion(
                client, prompt="doomed", max_tokens=20, ignore_eos=True, stream=True, temperature=0
            )
            events = sse_events(r.text)
            health = client.get("/health").status_code
    finally:
        handle.remove()
    assert r.status_code == 200  # the first output came before the failure
    assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "service_unavailable"
    assert "device lost" in events[-2]["error"]["message"]
    assert 1 <= len(events[:-2]) < 20 and all("choices" in e for e in events[:-2])
    assert health == 503 and isinstance(served.loop.error, RuntimeError)


# ---------------------------------------------------------------------- a real server


@pytest.fixture(scope="module")
def live(tiny_model) -> Iterator[SimpleNamespace]:
    served = serve(tiny_model, api_key=KEY)
    with uvicorn_server(served.app) as base_url:
        served.base_url = base_url
        yield served
    served.loop.stop()


def test_openai_client(live):
    client = openai.OpenAI(base_url=f"{live.base_url}/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in client.models.list().data] == [MODEL]
    args = {"model": MODEL, "max_tokens": 8, "temperature": 0, "extra_body": {"ignore_eos": True}}

    done = client.completions.create(prompt="The miller", **args)
    assert done.choices[0].finish_reason == "length" and done.usage.completion_tokens == 8
    stream = client.completions.create(prompt="The miller", stream=True,
                                       stream_options={"include_usage": True}, **args)  # fmt: skip
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == done.choices[0].text
    assert chunks[-1].usage.completion_tokens == 8

    reply = client.chat.completions.create(messages=MESSAGES, **args)
    assert reply.choices[0].message.role == "assistant" and reply.usage.completion_tokens == 8
    chunks = list(client.chat.completions.create(messages=MESSAGES, stream=True, **args))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == reply.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"

    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="hi")
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model=MODEL, prompt="hi", n=2)
    assert bad.value.body["param"] == "n"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{live.base_url}/v1", api_key="wrong", max_retries=0).models.list()


def test_disconnect_mid_stream_aborts_the_engine_request(live):
    body = {"model": MODEL, "prompt": "go on and on", "max_tokens": 900, "ignore_eos": True, "stream": True}
    headers = {"Authorization": f"Bearer {KEY}"}
    client = httpx.Client(base_url=live.base_url, headers=headers, timeout=30)
    with client, client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        lines = (line for line in r.iter_lines() if line.startswith("data: "))
        first = json.loads(next(lines).removeprefix("data: "))
        next(lines)
    # leaving the block closes the connection with the body unread: a client disconnect
    out = live.finished.wait_for(lambda o: o.request_id == first["id"])
    assert out.finish_reason is FinishReason.ABORT and out.num_output_tokens < 900
    assert not live.engine.has_unfinished() and live.loop.num_pending() == 0
    assert live.loop.stats()["finished"]["abort"] >= 1


def test_disconnect_while_waiting_for_a_whole_completion_aborts_it(live):
    def aborted(o: RequestOutput) -> bool:
        return o.finish_reason is FinishReason.ABORT

    before = len(live.finished.matching(aborted))
    body = {"model": MODEL, "prompt": "never read", "max_tokens": 900, "ignore_eos": True}
    headers = {"Authorization": f"Bearer {KEY}"}
    client = httpx.Client(base_url=live.base_url, headers=headers, timeout=httpx.Timeout(30, read=0.5))
    with client, pytest.raises(httpx.ReadTimeout):
        client.post("/v1/completions", json=body)  # gives up after 0.5 s and hangs up
    out = live.finished.wait_for(aborted, count=before + 1)
    assert out.request_id.startswith("cmpl-") and out.num_output_tokens < 900
    assert live.loop.stats()["finished"]["abort"] == before + 1
