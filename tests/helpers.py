"""Factory helpers shared by the engine tests."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import uvicorn

from harvest.engine import Engine, RequestOutput

PROMPT_LENGTHS = [1, 3, 7, 12, 20, 33, 47, 64, 5, 90]


def make_engine(model: Path, **kwargs) -> Engine:
    kwargs.setdefault("block_size", 4)
    kwargs.setdefault("profile_latency", False)
    return Engine.from_pretrained(str(model), **kwargs)


def make_prompts(engine: Engine, lengths: list[int] = PROMPT_LENGTHS, start: int = 0) -> list[list[int]]:
    """Token-id prompts of the given lengths, cut from the bundled corpus at different offsets
    from `start` (prompts cut at different offsets share no prefix for the prefix cache)."""
    from harvest.models.tiny import corpus_text

    ids = engine.tokenizer.encode(corpus_text())
    return [ids[start + 7 * i : start + 7 * i + n] for i, n in enumerate(lengths)]


def step_checked(engine: Engine) -> list[RequestOutput]:
    """One step, then the scheduler's integrity check (block manager, queues, counts)."""
    outs = engine.step()
    engine.scheduler.check_integrity()
    return outs


def run_checked(engine: Engine, max_steps: int = 5000) -> dict[str, RequestOutput]:
    """Step to completion, checking integrity after every step."""
    done: dict[str, RequestOutput] = {}
    for _ in range(max_steps):
        if not engine.has_unfinished():
            break
        for out in step_checked(engine):
            if out.finished:
                done[out.request_id] = out
    assert not engine.has_unfinished(), f"stuck after {max_steps} steps: {engine.scheduler.unfinished()}"
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    return done


def serve_app(model: Path, model_name: str, backend_class: type | None = None, max_model_len: int = 256,
              **app_options) -> SimpleNamespace:  # fmt: skip
    """An OpenAI app over a real engine loop: `.engine`, `.loop` (stop it), `.backend`, `.app`."""
    from harvest.api import LocalBackend, build_app
    from harvest.serving import EngineLoop

    engine = make_engine(model, max_num_seqs=4, max_model_len=max_model_len)
    loop = EngineLoop(engine)
    backend = (backend_class or LocalBackend)(loop, model_name)
    return SimpleNamespace(engine=engine, loop=loop, backend=backend, app=build_app(backend, **app_options))


def post_json(client, url: str, body: dict[str, Any]) -> Any:
    """POST `body` as json.dumps writes it: NaN, Infinity and \\ud800 escapes included, as a
    careless client would send them (httpx's own encoder refuses NaN)."""
    return client.post(url, content=json.dumps(body), headers={"content-type": "application/json"})


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


def wait_healthy(base: str, timeout_s: float = 60) -> None:
    """Until the service at `base` answers /health 200 (HAProxy may still be picking up the
    replicas after `harvest up` or `service.start` returned)."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"the service at {base} never became healthy"
        time.sleep(0.2)
