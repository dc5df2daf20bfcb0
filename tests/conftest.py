"""Shared fixtures: tiny models built once per session, a private redis-server per test module."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from harvest.local_redis import RedisProcess
from harvest.models.tiny import make_tiny


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """arch -> directory of a tiny random model saved with save_pretrained (built lazily)."""
    root = tmp_path_factory.mktemp("models")

    class Models(dict):
        def __missing__(self, arch: str) -> Path:
            self[arch] = make_tiny(root / arch, arch)
            return self[arch]

    return Models()


@pytest.fixture(scope="session")
def tiny_model(tiny_models) -> Path:
    return tiny_models["llama"]


class RedisServer(RedisProcess):
    """A redis-server of our own on a free port, so tests never share data; every write is
    fsynced before Redis answers (`appendfsync always`), so a restart loses nothing."""

    def __init__(self, data_dir: Path, appendonly: bool = True) -> None:
        super().__init__(data_dir, appendfsync="always" if appendonly else None)


@pytest.fixture
def redis_server(tmp_path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


# ---------------------------------------------------------------------- offline job queue


@pytest.fixture
def queue_store(redis_server):
    """A JobStore on the test's private redis-server."""
    from harvest.queue import JobStore

    return JobStore.from_url(redis_server.url)


@pytest.fixture
def queue_client(redis_server):
    from harvest.client import HarvestClient

    return HarvestClient(redis_server.url)


@pytest.fixture(scope="session")
def queue_engine(tiny_model):
    """One tiny-model engine shared by the queue tests (offline only: no latency profile needed)."""
    from harvest.engine import Engine

    return Engine.from_pretrained(str(tiny_model), max_num_seqs=32, profile_latency=False)


@pytest.fixture
def make_job(queue_store):
    """make_job(n, shard_size=..., max_tokens=..., sampling={body defaults}, **JobOptions fields)
    -> id of an in_progress job."""
    from harvest.queue import JobOptions
    from harvest.queue.inputs import read_items
    from harvest.queue.submit import submit

    def make(n: int, shard_size: int = 4, max_tokens: int = 4, sampling: dict | None = None,
             **options) -> str:  # fmt: skip
        defaults = {"max_tokens": max_tokens, "temperature": 0, **(sampling or {})}
        opts = JobOptions(shard_size=shard_size, defaults=defaults, **options)
        prompts = [f"prompt number {i}" for i in range(n)]
        return submit(queue_store, lambda: read_items(prompts, opts.defaults), opts)

    return make


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray for the whole test session (starting Ray costs seconds)."""
    import ray

    from harvest.names import NAMESPACE
    from harvest.serve_env import use_serve_env

    use_serve_env(private_ports=True)  # the same Serve front end as `harvest up`
    # "local": a new instance even where a `ray start` (harvest up) runs on this machine
    ray.init(address="local", num_cpus=4, namespace=NAMESPACE, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def loops():
    """EngineLoops registered here are stopped after the test, whatever happened."""
    started = []
    yield started
    for loop in started:
        loop.stop(timeout=30)
