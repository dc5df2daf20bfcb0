"""Bring the service up and down: Ray, the controller, and the workers as a Serve app.

Same code path on a laptop (a local Ray head started here) and on a cluster (`address`
of an existing Ray cluster, e.g. "auto" after `ray up cluster.yaml`).

The wiring of the roles: with the CLI and the Serve app builder (harvest/deploy.py) that
call it, this is the only place in `harvest` that imports actors/ and controller/. The
library packages never import it or them (tests/test_layers.py holds them to that).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import ray

from controller.controller import controller_actor
from harvest.config import HarvestConfig
from harvest.names import CONTROLLER_NAME, NAMESPACE


@dataclass
class ServiceConfig:
    model: str
    redis_url: str = field(repr=False)  # may hold a password: kept out of reprs and logs
    model_name: str = "harvest"
    model_aliases: list[str] = field(default_factory=list)  # more names clients may pass as `model`
    num_workers: int | None = None  # None: one per GPU, or one CPU worker
    port: int = 8000
    host: str = "127.0.0.1"
    api_key: str | dict[str, str] | None = field(default=None, repr=False)  # one key, or {key: tenant}
    engine_options: dict[str, Any] = field(default_factory=dict)
    queue_options: dict[str, Any] = field(default_factory=dict)
    monitor_period_s: float = 0.25
    job_ttl_s: float | None = None  # how long finished jobs are kept (None: as the store has it, 7 days)
    files_uri: str | None = None  # Batch API file bytes: a directory or pyarrow.fs URI (None: the data dir)
    # a file path on every node: a worker drains when it appears there (a spot termination notice)
    termination_notice: str | None = None

    def __post_init__(self) -> None:
        if self.num_workers is not None and self.num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {self.num_workers}")
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in 1..65535, got {self.port}")
        if self.job_ttl_s is not None and self.job_ttl_s <= 0:
            raise ValueError(f"job_ttl_s must be > 0, got {self.job_ttl_s}")


APP_NAME = "harvest"


def service_config(config: HarvestConfig, model: str, redis_url: str) -> ServiceConfig:
    """The service's settings from the user-facing config (`model`: what the workers load)."""
    first, *aliases = config.model_names()
    return ServiceConfig(
        model=model,
        redis_url=redis_url,
        model_name=first,
        model_aliases=aliases,
        num_workers=config.workers,
        port=config.port,
        host=config.host,
        api_key=config.resolved_api_key(),
        engine_options=config.engine_options(),
        queue_options=config.queue.options(),
        job_ttl_s=config.job_ttl_s,
        termination_notice=str(config.termination_notice) if config.termination_notice else None,
    )


def connect(address: str | None) -> None:
    if not ray.is_initialized():
        ray.init(address=address, namespace=NAMESPACE, log_to_driver=False, logging_level="error")


def application(config: ServiceConfig) -> Any:
    """The workers' Serve application for `config`, with the controller they report to started
    (or found running). Ray must be up. `start` runs it; `harvest.deploy:app` hands it to
    `serve run` / `serve deploy` / a KubeRay RayService."""
    from actors.gpu_worker import worker_application

    if config.job_ttl_s is not None:  # kept in Redis, so every process retires jobs alike
        from harvest.queue.store import JobStore

        JobStore.from_url(config.redis_url).set_job_ttl(config.job_ttl_s)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    workers = config.num_workers or max(1, gpus)
    settings = {**asdict(config), "num_workers": workers, "use_gpu": gpus > 0}
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # on the node that starts the service (the head, for `harvest up` there): a controller
    # that landed on a GPU node would restart whenever that node goes (spot, drain, failure).
    # Ray puts an actor that asks for no resources on a random node, soft affinity or not
    # (only a hard one holds; raylet cluster_resource_scheduler.cc), so the controller asks
    # for one byte of memory: the affinity holds, and a restart once this node is gone
    # still goes elsewhere (it lost the second node of a two-node cluster one run in two)
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    controller_actor().options(
        name=CONTROLLER_NAME,
        namespace=NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
        scheduling_strategy=here,
        memory=1,
    ).remote(settings)
    return worker_application(settings, workers, gpus > 0)


def start(config: ServiceConfig, ready_timeout_s: float = 300.0) -> dict[str, Any]:
    """Start (or find running) the controller, then the workers as a Serve app. Ray must be up."""
    from ray import serve

    workers_app = application(config)
    controller = controller_handle()  # named actors are registered when created: no race
    serve.start(http_options={"host": config.host, "port": config.port})
    serve.run(workers_app, name=APP_NAME, route_prefix="/", blocking=False)
    deadline = time.monotonic() + ready_timeout_s
    while not ray.get(controller.ready.remote()):
        app = serve.status().applications.get(APP_NAME)
        if app is not None and app.status == "DEPLOY_FAILED":  # e.g. a model that does not load
            raise RuntimeError(f"the workers failed to start: {app.message}")
        if time.monotonic() > deadline:
            raise TimeoutError("workers did not come up; see `ray status`, `serve status` and the Ray logs")
        time.sleep(0.2)
    return ray.get(controller.status.remote())


def controller_handle() -> Any:
    return ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)


def status() -> dict[str, Any]:
    return ray.get(controller_handle().status.remote(), timeout=30)


def drain(target: str, reason: str = "harvest drain") -> dict[str, Any]:
    """Drain a worker or every worker of a node (controller.drain); ValueError if unknown."""
    return ray.get(controller_handle().drain.remote(target, reason), timeout=30)


def stop() -> None:
    """Stop the workers (Serve's graceful shutdown gives their shards back), then the controller."""
    from ray import serve

    with contextlib.suppress(Exception):  # Serve not running
        serve.shutdown()
    try:
        handle = controller_handle()
    except ValueError:
        return
    ray.get(handle.shutdown.remote(), timeout=120)
    ray.kill(handle, no_restart=True)
