"""GPUWorker: one engine per GPU (or one CPU worker), hosted in its own Serve replica.

The replica is the engine's HTTP front end too: HAProxy forwards each request to a
replica's own server (Serve's direct ingress), and the OpenAI app there talks to the
engine loop in the same process. There is no second process between the HTTP handler
and the engine, which is the shape of a single-process server such as `transformers
serve`: on the 2-core box each token crossing worker actor -> ingress replica had cost
the serving path a Ray hop and its share of the cores (peers suite, harvest / peer P99:
1.28x / 1.31x through the actor, 0.97x / 1.08x with the engine in the HTTP process).

The engine's step loop runs in a background thread (`EngineLoop`). Offline shards are
leased from the Redis job store by the same `OfflineWorker` that `harvest work --local`
uses: the loop's `on_step` hook routes each step's outputs to their shards and the
worker's I/O thread does the Redis traffic. A heartbeat thread reports the worker's
stats to the controller and applies its answer: offline leasing on or off, and the SLO.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import ray
from ray import serve

from controller.controller import CONTROLLER_NAME, NAMESPACE
from harvest.api.app import build_app
from harvest.api.backend import BackendUnavailable
from harvest.api.local import LocalBackend
from harvest.batch import BatchService
from harvest.engine import Engine, RequestOutput, SamplingParams
from harvest.queue.config import WorkerConfig
from harvest.queue.store import JobStore
from harvest.queue.worker import OfflineWorker
from harvest.serving import EngineLoop, freeze_heap, render_engine_metrics
from harvest.serving.feedback import SLOFeedback

log = logging.getLogger(__name__)

WORKER_DEPLOYMENT = "harvest-worker"

# On the CPU device, an offline-only step within a second of online work is followed by a
# pause as long as itself (a submission ends it at once): the serving path (client,
# HAProxy, the HTTP stack) gets the cores back for the next request's way in. On the
# 2-core box next to a backlog (peers suite, 3 rounds each): TTFT P99 over serving alone
# 1.23-1.36x -> 0.96-1.15x, at a median 991 instead of 1,518 offline tok/s.
# `engine_options["offline_yield"]` overrides it (0 turns it off).
CPU_OFFLINE_YIELD = 1.0


class GPUWorker:
    """An engine, its loop, the offline side and the controller's heartbeat, in this process."""

    def __init__(
        self,
        worker_id: str,
        model: str,
        redis_url: str,
        engine_options: dict[str, Any] | None = None,
        queue_options: dict[str, Any] | None = None,
    ) -> None:
        import torch

        # several threads share this process's GIL: the engine loop, the event loop streaming
        # tokens out over HTTP, the queue's I/O thread, the checkpoint shipper. At the default
        # 5 ms switch interval a token waiting to leave waits for a step's Python to yield.
        sys.setswitchinterval(0.0005)
        options = dict(engine_options or {})
        options.setdefault("device", "cuda" if torch.cuda.is_available() else "cpu")
        # offline steps compute on the cores the serving path runs on only on the CPU device
        offline_yield = options.pop("offline_yield", CPU_OFFLINE_YIELD if options["device"] == "cpu" else 0.0)
        if options["device"] == "cpu":  # as many threads as CPUs Ray gave us, or workers fight for cores
            cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
            torch.set_num_threads(max(1, int(cpus)))
        from actors.checkpoint_keeper import RayCheckpointStore, keeper_for_this_node

        self.worker_id = worker_id
        self.engine = Engine.from_pretrained(
            model, checkpoint_store=RayCheckpointStore(*keeper_for_this_node()), **options
        )
        self.store = JobStore.from_url(redis_url)
        self.offline = OfflineWorker(
            self.store, self.engine, WorkerConfig(**(queue_options or {})), worker_id
        )
        self.frozen_objects = freeze_heap()  # the model is loaded: no full GC walks it again
        self.started = time.time()
        self.loop = EngineLoop(
            self.engine,
            on_step=self._on_step,
            idle_tick_s=0.05,
            offline_yield=offline_yield,
            name=f"engine-{worker_id}",
        )
        self.offline.on_work = self.loop.wake  # shards leased while the loop idles: step them now
        # the controller's SLO; the engine plans for `feedback.scale` of it
        slo = self.engine.scheduler.config.slo
        self.slo_target: tuple[float, float] = (slo.ttft_s, slo.tpot_s)
        self.feedback = SLOFeedback()
        self._feedback_lock = threading.Lock()
        self._stop = threading.Event()

    def _on_step(self, outputs: list[RequestOutput]) -> None:
        """Runs on the loop thread after every step (and every idle tick)."""
        self.offline.sync(outputs)

    # ------------------------------------------------------------------ the controller's levers

    def set_offline(self, enabled: bool) -> None:
        """The offline budget switch: off stops leasing new shards (running ones finish)."""
        self.offline.leasing = enabled

    def set_slo(self, ttft_s: float, tpot_s: float) -> None:
        """The online SLO; the engine sizes offline work against its current share of it."""
        from harvest.engine.config import SLOConfig

        SLOConfig(ttft_s=ttft_s, tpot_s=tpot_s)  # validate before touching the live one
        with self._feedback_lock:
            self.slo_target = (ttft_s, tpot_s)
            self._plan_for(self.feedback.scale)

    def _plan_for(self, scale: float) -> None:
        slo = self.engine.scheduler.config.slo
        slo.ttft_s, slo.tpot_s = self.slo_target[0] * scale, self.slo_target[1] * scale

    def observe(self, ttft_s: float, decode_s: float, tokens: int) -> None:
        """A finished online request as its HTTP handler saw it (feedback.py)."""
        with self._feedback_lock:
            self.feedback.observe([ttft_s], [decode_s / (tokens - 1)] if tokens > 1 else [])
            if (scale := self.feedback.update(*self.slo_target)) is not None:
                self._plan_for(scale)

    def apply(self, reply: dict[str, Any]) -> None:
        """The controller's answer to a heartbeat."""
        self.set_offline(reply["offline"])
        if reply.get("slo") and tuple(reply["slo"]) != self.slo_target:
            self.set_slo(*reply["slo"])

    def start_heartbeats(self, period_s: float) -> None:
        threading.Thread(target=self._heartbeats, args=(period_s,), name="heartbeat", daemon=True).start()

    def _heartbeats(self, period_s: float) -> None:
        me, controller = ray.get_runtime_context().current_actor, None
        while not self._stop.wait(period_s):
            try:
                controller = controller or ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)
                reply = ray.get(controller.heartbeat.remote(self.worker_id, self.stats(), me),
                                timeout=max(2.0, 4 * period_s))  # fmt: skip
            except ray.exceptions.GetTimeoutError:
                continue  # restarting: online serving does not depend on the controller
            except (ray.exceptions.RayError, ValueError):
                controller = None  # gone for good, or not started yet: look it up again
                continue
            self.apply(reply)
            period_s = reply.get("period_s", period_s)  # a large fleet reports less often

    # ------------------------------------------------------------------ views

    def health(self, max_stall_s: float = 30.0) -> bool:
        return self.loop.healthy(max_stall_s)

    def stats(self) -> dict[str, Any]:
        s = self.loop.stats()
        ctx = ray.get_runtime_context()
        s.update(
            worker_id=self.worker_id,
            pid=os.getpid(),
            node_id=ctx.get_node_id(),
            actor_name=ctx.get_actor_name(),  # the Serve replica, in Serve's namespace
            offline_enabled=self.offline.leasing,
            offline_paused=self.offline.paused,  # e.g. "Redis unreachable since ...: cause"
            shards=sorted(self.offline.shards),
            offline_inflight=self.offline.inflight_requests,
            kv_blocks_total=self.engine.block_manager.num_blocks,
            kv_blocks_used=self.engine.block_manager.num_used_blocks,
            max_model_len=self.engine.max_model_len,
            slo={
                "ttft_s": self.engine.scheduler.config.slo.ttft_s,
                "tpot_s": self.engine.scheduler.config.slo.tpot_s,
            },
            slo_target=list(self.slo_target),
            slo_scale=self.feedback.scale,
            capacity_tokens=self.engine.capacity_tokens,
            gc_frozen_objects=self.frozen_objects,
            uptime_s=time.time() - self.started,
        )
        return s

    def shutdown(self) -> None:
        """Give leased shards back (no attempt spent), stop the loop, leave the controller."""
        self._stop.set()
        self.offline.leasing = False
        self.loop.stop()
        # a loop that died in a step is a crash, not a graceful stop: its requests are charged
        self.offline.release_all(crashed=self.loop.error is not None)
        with contextlib.suppress(ValueError):  # no controller: nobody to tell
            ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE).leave.remote(self.worker_id)


class WorkerBackend(LocalBackend):
    """The app's `Backend` over the worker in this process: its engine loop, and the
    latencies its handlers see going back to the worker's SLO feedback."""

    def __init__(
        self,
        worker: GPUWorker,
        model_name: str | list[str],
        max_pending: int | None = None,
        typical_request_tokens: int = 512,
    ) -> None:
        if max_pending is None:
            # as many online requests as the KV pool holds at a typical size (prompt + output),
            # and never fewer than one full batch: a request past that would only wait for
            # others to finish, so it gets a 429 with Retry-After (the client backs off) instead
            # of an unbounded queue in this process
            engine = worker.engine
            by_kv = engine.capacity_tokens // typical_request_tokens
            max_pending = max(engine.config.scheduler.max_num_seqs, by_kv)
        super().__init__(worker.loop, model_name, max_pending=max_pending)
        self.worker = worker

    async def generate(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        start, first = time.monotonic(), None
        stream = super().generate(prompt_token_ids, params, request_id)
        try:
            async for out in stream:
                if first is None and out.new_token_ids:
                    first = time.monotonic()
                if out.finished and first is not None:
                    self.worker.observe(first - start, time.monotonic() - first, out.num_output_tokens)
                yield out
        finally:
            await stream.aclose()  # left early: the engine request is aborted now, not at GC

    async def metrics_text(self) -> str:
        """Every worker's engine figures and the offline queue (from the controller), else this
        worker's figures alone."""
        try:
            controller = ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)
            status = await controller.status.remote()
        except (ray.exceptions.RayError, ValueError):
            status = None
        workers = (status or {}).get("workers") or {self.worker.worker_id: self.worker.stats()}
        return render_engine_metrics(workers, status)


_hosted: WorkerBackend | None = None  # the backend of the worker this replica process hosts


def _host(backend: WorkerBackend) -> None:
    # a module-level function: the replica class is pickled by value, with globals of its own
    global _hosted
    _hosted = backend


class HostedBackend:
    """Stands in for `WorkerBackend` in the app that Serve pickles into each replica; the
    replica's constructor sets the real one once its engine is up."""

    def _get(self) -> WorkerBackend:
        if _hosted is None:
            raise BackendUnavailable("the worker is still starting")
        return _hosted

    def __getattr__(self, name: str) -> Any:  # tokenizer, max_model_len, generate, abort, health, metrics
        if name.startswith("_"):  # pickling probes dunders before __dict__ is restored
            raise AttributeError(name)
        return getattr(self._get(), name)


def worker_application(config: dict[str, Any], num_replicas: int, use_gpu: bool):
    """The Serve app: `num_replicas` workers, each one GPU (or one CPU) and its HTTP front end.

    Every front end serves the Files and Batches APIs over the service's Redis; file bytes go
    to `files_uri` (a pyarrow.fs URI every node reaches) or, by default, the data dir here.
    """
    batch = BatchService(config["redis_url"], config.get("files_uri"))
    app = build_app(HostedBackend(), config.get("api_key"), batch=batch)
    resources = {"num_gpus": 1, "num_cpus": 1} if use_gpu else {"num_cpus": 1}

    @serve.deployment(
        name=WORKER_DEPLOYMENT,
        num_replicas=num_replicas,
        ray_actor_options=resources,
        max_ongoing_requests=1000,
    )
    @serve.ingress(app)
    class Worker:
        def __init__(self, config: dict[str, Any]) -> None:
            replica = serve.get_replica_context().replica_id.unique_id
            self.worker = GPUWorker(f"{WORKER_DEPLOYMENT}-{replica}", config["model"], config["redis_url"],
                                    config.get("engine_options"), config.get("queue_options"))  # fmt: skip
            _host(WorkerBackend(self.worker, [config["model_name"], *config.get("model_aliases", [])]))
            self.worker.start_heartbeats(config.get("monitor_period_s", 0.25))

        def check_health(self) -> None:  # Serve replaces a replica whose check raises
            if not self.worker.health():
                raise RuntimeError(f"engine loop of {self.worker.worker_id} stalled or died")

        def __del__(self) -> None:  # Serve's graceful shutdown
            if hasattr(self, "worker"):  # the constructor may have failed
                self.worker.shutdown()

    return Worker.bind(config)
