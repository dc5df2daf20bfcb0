"""The HTTP edge is bounded: a body over the cap is a 413, tokenizing a huge prompt does
not stall /health, a full online queue is a 429 (see also test_api.py)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace

import httpx
import pytest
from fastapi.testclient import TestClient

from harvest.api import LocalBackend
from harvest.protocol.requests import COMPLETIONS
from harvest.serving import EngineLoop
from tests.helpers import make_engine, post_json, serve_app, uvicorn_server

MODEL = "tiny-llama"


def post(client, url: str, body: dict) -> httpx.Response:
    return post_json(client, url, {"model": MODEL} | body)


def test_body_over_the_cap_is_413_declared_or_streamed(tiny_model):
    served = serve_app(tiny_model, MODEL, max_body_bytes=4096)
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
    served = serve_app(tiny_model, MODEL, WatchedBackend)
    prompt = "the river runs " * 470_000  # 7 MB: under the 8 MiB cap, seconds to tokenize
    watched = served.backend.watched = WatchedTokenizer(served.engine.tokenizer, large=len(prompt))
    answer: dict[str, httpx.Response] = {}
    try:
        with uvicorn_server(served.app) as base_url:

            def send_huge() -> None:
                with httpx.Client(base_url=base_url, timeout=120) as client:
                    answer["huge"] = post(client, COMPLETIONS, {"prompt": prompt, "max_tokens": 1})

            with httpx.Client(base_url=base_url, timeout=10) as client:
                assert client.get("/health").status_code == 200  # connected before the clock starts
                sender = threading.Thread(target=send_huge)
                sender.start()
                assert watched.started.wait(60), "the huge prompt was never tokenized"
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

    engine = make_engine(tiny_model, max_num_seqs=4, num_blocks=num_blocks, max_model_len=256)
    worker = SimpleNamespace(engine=engine, loop=EngineLoop(engine))
    try:
        # 1024 blocks of 4 tokens hold 8 requests of 512 tokens; 64 blocks hold fewer than a batch
        assert WorkerBackend(worker, MODEL).max_pending == expected
        assert WorkerBackend(worker, MODEL, max_pending=2).max_pending == 2
    finally:
        worker.loop.stop()


def test_the_tokenizer_pool_pickles_after_use():
    # Serve ships the app, whose routes hold the pool, with cloudpickle; threads do not travel
    from ray import cloudpickle

    from harvest.api.inputs import Tokenizing

    tokenizing = Tokenizing(threads=2)
    assert tokenizing.pool.submit(sum, [1, 2]).result() == 3
    clone = cloudpickle.loads(cloudpickle.dumps(tokenizing))
    assert clone.threads == 2 and clone.pool.submit(sum, [3]).result() == 3
    tokenizing.pool.shutdown()
    clone.pool.shutdown()
