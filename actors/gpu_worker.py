"""GPUWorker: one engine per GPU (or one CPU worker), hosted in its own Serve replica.

The replica is the engine's HTTP front end too: HAProxy forwards each request to a
replica's own server (Serve's direct ingress), and the OpenAI app there talks to the
engine loop in the same process, the shape of a single-process server such as
`transformers serve`: no Ray hop and no second process between a token and its HTTP
stream (docs/BENCHMARKS.md, peers suite, measured what the hop cost).

The replica's constructor is the entry point that wires it (Ray Serve LLM's `LLMServer`
shape): an engine factory (`load_engine`: the model in an `EngineLoop`, this node's
checkpoint keeper as its store, the device's `DeviceProfile` applied) builds the engine,
and the worker gets it with its job store and queue settings. Everything here talks to
the engine as an `EngineClient`. Offline shards are leased from the Redis job store by
the same `OfflineWorker` that `harvest work --local` uses: it submits their requests
through the engine with each shard as their sink, and its I/O thread does the Redis
traffic. A heartbeat thread reports the worker's stats to the controller and applies its
answer: offline leasing on or off, the SLO (through the engine's inbox), and a drain order
(`GPUWorker.drain`: the worker hands its work back and leaves; docs/ARCHITECTURE.md, Drain).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict
from typing import Any, Protocol

import ray
from fastapi import FastAPI
from ray import serve

from harvest.api.app import build_app
from harvest.api.local import LocalBackend
from harvest.batch import BatchService
from harvest.checkpoint.handle import CheckpointHandle
from harvest.engine import Engine, RequestClass, RequestOutput, SamplingParams
from harvest.names import CONTROLLER_NAME, NAMESPACE
from harvest.protocol.engine_client import EngineClient
from harvest.queue.config import WorkerConfig
from harvest.queue.store import JobStore
from harvest.queue.worker import OfflineWorker
from harvest.serving import EngineLoop, freeze_heap, render_engine_metrics
from harvest.serving.device_profile import DeviceProfile
from harvest.serving.engine_loop import StepHook
from harvest.serving.feedback import SLOFeedback

log = logging.getLogger(__name__)

WORKER_DEPLOYMENT = "harvest-worker"


class HostedEngine(EngineClient, Protocol):
    """What a worker runs on: an engine client, and the levers of the one who runs it.

    `EngineLoop` is one; tests run the worker over a mock (tests/mock_engine.py)."""

    on_step: StepHook | None  # called on the engine's thread after every step and idle tick

    @property
    def slo(self) -> tuple[float, float]:
        """The (TTFT, TPOT) targets the engine plans with now."""
        ...

    @property
    def error(self) -> BaseException | None:
        """What killed the engine's thread, if anything."""
        ...

    def stop(self, timeout: float | None = 10.0) -> bool: ...


# builds the engine one worker runs: (worker id, the service's settings) -> engine
EngineFactory = Callable[[str, dict[str, Any]], HostedEngine]
# (checkpoint handle, node id) -> the handle of a copy in that node's keeper (RayCheckpointStore.send)
ShipCheckpoint = Callable[[CheckpointHandle, str], CheckpointHandle]


class GPUWorker:
    """An engine, the offline side that feeds it and the controller's heartbeat, in this process.

    Built by its entry point (the Serve replica's constructor) with what it runs on: the
    engine, the job store and the queue's settings. `labels` go into every stats report
    (where the worker runs); `frozen_objects`: what the entry point froze out of GC."""

    def __init__(
        self,
        worker_id: str,
        engine: HostedEngine,
        store: JobStore,
        config: WorkerConfig | None = None,
        *,
        labels: dict[str, Any] | None = None,
        frozen_objects: int = 0,
        ship: ShipCheckpoint | None = None,
        termination_notice: str | None = None,
    ) -> None:
        self.worker_id = worker_id
        self.loop = engine  # the engine, seen as a client: an EngineLoop, or a mock in tests
        self.store = store
        self.labels = dict(labels or {})
        self.frozen_objects = frozen_objects
        self.started = time.time()
        self.offline = OfflineWorker(store, engine, config or WorkerConfig(), worker_id)
        engine.on_step = self._on_step  # now that the offline side it ticks exists
        # the controller's SLO; the engine plans for `feedback.scale` of it
        self.slo_target: tuple[float, float] = engine.slo
        self.feedback = SLOFeedback()
        self._feedback_lock = threading.Lock()
        self._stop = threading.Event()
        self.ship = ship
        self.termination_notice = termination_notice  # a file whose appearance starts a drain
        self.drain_state: dict[str, Any] | None = None  # None while in service; see `drain`
        self._drain_requested = False
        self._drain_lock = threading.Lock()

    def _on_step(self, outputs: list[RequestOutput]) -> None:
        """Runs on the loop thread after every step (and every idle tick)."""
        self.offline.tick()

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
        self.loop.set_slo(self.slo_target[0] * scale, self.slo_target[1] * scale)

    def observe(self, ttft_s: float, decode_s: float, tokens: int) -> None:
        """A finished online request as its HTTP handler saw it (feedback.py)."""
        with self._feedback_lock:
            self.feedback.observe([ttft_s], [decode_s / (tokens - 1)] if tokens > 1 else [])
            if (scale := self.feedback.update(*self.slo_target)) is not None:
                self._plan_for(scale)

    def apply(self, reply: dict[str, Any]) -> None:
        """The controller's answer to a heartbeat."""
        if reply.get("drain"):
            self.drain(**reply["drain"])
        self.set_offline(reply["offline"] and self.drain_state is None)
        if reply.get("slo") and tuple(reply["slo"]) != self.slo_target:
            self.set_slo(*reply["slo"])

    def start_heartbeats(self, period_s: float) -> None:
        threading.Thread(target=self._heartbeats, args=(period_s,), name="heartbeat", daemon=True).start()

    def _heartbeats(self, period_s: float) -> None:
        me, controller, send_handle = ray.get_runtime_context().current_actor, None, True
        while not self._stop.wait(period_s):
            self.check_termination_notice()
            try:
                controller = controller or ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)
                handle = me if send_handle else None  # the controller asks for it when it lacks it
                reply = ray.get(controller.heartbeat.remote(self.worker_id, self.stats(), handle),
                                timeout=max(2.0, 4 * period_s))  # fmt: skip
            except ray.exceptions.GetTimeoutError:
                continue  # restarting: online serving does not depend on the controller
            except (ray.exceptions.RayError, ValueError):
                controller = None  # gone for good, or not started yet: look it up again
                continue
            self.apply(reply)
            period_s = reply.get("period_s", period_s)  # a large fleet reports less often
            send_handle = reply.get("send_handle", True)

    # ------------------------------------------------------------------ drain

    def check_termination_notice(self) -> bool:
        """Drain once the termination notice file appears (a cloud's spot notice, written
        by the operator's watcher or a preStop hook); the heartbeat thread looks each period."""
        notice = self.termination_notice
        if notice and not self._drain_requested and os.path.exists(notice):
            self.request_drain(f"termination notice {notice}")
            return True
        return False

    def request_drain(self, reason: str) -> None:
        """Drain on this worker's own initiative (a termination notice): through the
        controller, which names the node to ship checkpoints to; without one, keep them here.
        Returns at once."""
        self._drain_requested = True

        def ask() -> None:
            order: dict[str, Any] = {"reason": reason}
            try:
                if ray.is_initialized():
                    controller = ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)
                    order = ray.get(controller.drain.remote(self.worker_id, reason), timeout=5)["order"]
            except (ray.exceptions.RayError, ValueError) as exc:
                log.warning("drain without the controller (%s): checkpoints stay on this node", exc)
            self.drain(**order)

        threading.Thread(target=ask, name="drain-request", daemon=True).start()

    def drain(self, reason: str = "drain", keeper_node: str | None = None) -> None:
        """Leave service gracefully; idempotent. Offline: lease nothing more, take the
        running requests out of the engine with their KV checkpoints, ship those to the
        keeper of `keeper_node` (a node that stays; None: this node's keeper keeps them),
        record them as the shards' progress and give the shards back without spending an
        attempt. Online: its health check fails from now on, so Serve's replica answers
        HAProxy's checks with 503 and HAProxy stops sending it requests; until then it
        serves them as before (a 503 at once came back to the client in the two-node test:
        least connections most likely sent each retry back to the refusing worker, the one
        with the fewest connections). After three failed checks
        Serve stops it gracefully (its requests in flight finish; nothing offline is left to
        give back) and starts a replacement."""
        with self._drain_lock:
            if self.drain_state is not None:
                return
            self.drain_state = {"state": "draining", "reason": reason, "since": time.time(),
                                "keeper_node": keeper_node}  # fmt: skip
        self.offline.leasing = False
        log.warning("%s draining (%s); checkpoints to node %s", self.worker_id, reason, keeper_node or "here")
        threading.Thread(target=self._drain, args=(keeper_node,), name="drain", daemon=True).start()

    def _drain(self, keeper_node: str | None) -> None:
        ship = self.ship
        keep = (lambda handle: ship(handle, keeper_node)) if ship and keeper_node else None
        try:
            offline = asdict(self.offline.hand_back(keep))
        except Exception:  # a bug here must not keep the worker in service: its leases expire
            log.exception("%s: giving the offline work back failed", self.worker_id)
            offline = None
        # the state is replaced, never changed in place: the heartbeat thread sends it meanwhile
        self.drain_state = {**self.drain_state, "state": "serving out", "offline": offline,
                            "online_inflight": self.loop.num_pending()}  # fmt: skip
        while self.loop.num_pending() and self.loop.running:  # HTTP requests (online, flex) in flight
            time.sleep(0.05)
        since = self.drain_state["since"]
        self.drain_state = {**self.drain_state, "state": "drained", "drained_after_s": time.time() - since}
        log.warning("%s drained: %s", self.worker_id, self.drain_state)

    # ------------------------------------------------------------------ views

    def health(self, max_stall_s: float = 30.0) -> bool:
        """The engine loop is alive and not stalled, and the worker is not draining."""
        return self.drain_state is None and self.loop.healthy(max_stall_s)

    def stats(self) -> dict[str, Any]:
        """The loop's own report (its figures as of its last step) and the worker's."""
        s = self.loop.stats()
        s.update(
            self.labels,
            worker_id=self.worker_id,
            pid=os.getpid(),
            offline_enabled=self.offline.leasing,
            draining=self.drain_state,  # None while in service
            offline_paused=self.offline.paused,  # e.g. "Redis unreachable since ...: cause"
            shards=sorted(self.offline.shards),
            offline_inflight=self.offline.inflight_requests,
            max_model_len=self.loop.limits.max_model_len,
            slo=dict(zip(("ttft_s", "tpot_s"), self.loop.slo)),
            slo_target=list(self.slo_target),
            slo_scale=self.feedback.scale,
            capacity_tokens=self.loop.limits.capacity_tokens,
            gc_frozen_objects=self.frozen_objects,
            uptime_s=time.time() - self.started,
        )
        return s

    def shutdown(self) -> None:
        """Give leased shards back (no attempt spent) and stop the engine."""
        self._stop.set()
        self.offline.leasing = False
        self.loop.stop()
        # an engine that died in a step is a crash, not a graceful stop: its requests are charged
        self.offline.release_all(crashed=self.loop.error is not None)


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
            limits = worker.loop.limits
            max_pending = max(limits.max_num_seqs, limits.capacity_tokens // typical_request_tokens)
        super().__init__(worker.loop, model_name, max_pending=max_pending)
        self.worker = worker

    async def generate(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        request_id: str,
        request_class: RequestClass = RequestClass.ONLINE,
    ) -> AsyncIterator[RequestOutput]:
        start, first = time.monotonic(), None
        online = request_class is RequestClass.ONLINE  # a flex request is outside the online SLO
        stream = super().generate(prompt_token_ids, params, request_id, request_class)
        try:
            async for out in stream:
                if first is None and out.new_token_ids:
                    first = time.monotonic()
                if out.finished and first is not None and online:
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


def load_engine(worker_id: str, config: dict[str, Any]) -> EngineLoop:
    """The model of `config` in an engine loop, with this node's checkpoint keeper as its store
    and the device's host tuning applied to this process (a worker's entry point)."""
    import torch

    from actors.checkpoint_keeper import RayCheckpointStore, keeper_for_this_node

    options = dict(config.get("engine_options") or {})
    options.setdefault("device", "cuda" if torch.cuda.is_available() else "cpu")
    cpus = int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))
    profile = DeviceProfile.for_device(options["device"], cpus)
    profile.apply()
    # `engine_options["offline_yield"]` overrides the profile's pacing (0 turns it off)
    offline_yield = options.pop("offline_yield", profile.offline_yield)
    store = RayCheckpointStore(*keeper_for_this_node())
    engine = Engine.from_pretrained(config["model"], checkpoint_store=store, **options)
    return EngineLoop(engine, idle_tick_s=0.05, offline_yield=offline_yield, name=f"engine-{worker_id}")


def worker_application(
    config: dict[str, Any], num_replicas: int, use_gpu: bool, engine_factory: EngineFactory = load_engine
):
    """The Serve app: `num_replicas` workers, each one GPU (or one CPU) and its HTTP front end.

    Each replica builds its engine with `engine_factory` (Ray Serve LLM's `engine_cls`), its
    worker over it, then its OpenAI app over that worker: the app is built in the replica
    (`__serve_build_asgi_app__`, called by Serve after the constructor), so its routes hold
    the replica's own backend and no stand-in is pickled in its place. Every front end
    serves the Files and Batches APIs over the service's Redis; file bytes go to
    `files_uri` (a pyarrow.fs URI every node reaches) or, by default, the data dir here.
    """
    resources = {"num_gpus": 1, "num_cpus": 1} if use_gpu else {"num_cpus": 1}

    @serve.deployment(
        name=WORKER_DEPLOYMENT,
        num_replicas=num_replicas,
        ray_actor_options=resources,
        max_ongoing_requests=1000,
    )
    @serve.ingress()
    class Worker:
        def __init__(self, config: dict[str, Any]) -> None:
            self.config = config
            worker_id = f"{WORKER_DEPLOYMENT}-{serve.get_replica_context().replica_id.unique_id}"
            engine = engine_factory(worker_id, config)
            frozen = freeze_heap()  # the model is loaded: no full GC walks it again
            ctx = ray.get_runtime_context()  # the actor's name is in Serve's namespace
            where = {"node_id": ctx.get_node_id(), "actor_name": ctx.get_actor_name()}
            store = getattr(engine, "checkpoint_store", None)
            self.worker = GPUWorker(
                worker_id,
                engine,
                JobStore.from_url(config["redis_url"]),
                WorkerConfig(**(config.get("queue_options") or {})),
                labels=where,
                frozen_objects=frozen,
                ship=getattr(store, "send", None),  # a RayCheckpointStore's; tests' engines have none
                termination_notice=config.get("termination_notice"),
            )
            self.worker.start_heartbeats(config.get("monitor_period_s", 0.25))

        def __serve_build_asgi_app__(self) -> FastAPI:
            config = self.config
            names = [config["model_name"], *config.get("model_aliases", [])]
            batch = BatchService(config["redis_url"], config.get("files_uri"))
            return build_app(WorkerBackend(self.worker, names), config.get("api_key"), batch=batch)

        def check_health(self) -> None:  # Serve replaces a replica whose check raises
            if not self.worker.health():
                why = "draining" if self.worker.drain_state else "engine loop stalled or died"
                raise RuntimeError(f"{self.worker.worker_id}: {why}")

        def __del__(self) -> None:  # Serve's graceful shutdown
            if hasattr(self, "worker"):  # the constructor may have failed
                self.worker.shutdown()
                with contextlib.suppress(ValueError):  # no controller: nobody to tell
                    ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE).leave.remote(self.worker.worker_id)

    return Worker.bind(config)
