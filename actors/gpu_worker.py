"""GPUWorker: one Ray actor per GPU (or one CPU worker), hosting one engine.

The engine's step loop runs in a background thread (`EngineLoop`). Online requests come
from the Serve ingress as Ray streaming-generator calls; offline shards are leased from the
Redis job store by the same `OfflineWorker` that `harvest work --local` uses: the loop's
`on_step` hook routes each step's outputs to their shards, and the worker's I/O thread
does the Redis traffic, renewing leases only while the loop keeps calling. The controller
turns offline leasing on and off.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import ray

from actors.worker_metrics import WorkerMetrics
from harvest.engine import Engine, RequestOutput, SamplingParams
from harvest.queue.config import WorkerConfig
from harvest.queue.store import JobStore
from harvest.queue.worker import OfflineWorker
from harvest.serving import EngineLoop, freeze_heap

log = logging.getLogger(__name__)

# On the CPU device, an offline-only step within a second of online work is followed by a
# pause as long as itself (a submission ends it at once): the serving path (client,
# HAProxy, the ingress, Ray) gets the cores back for the next request's way in. On the
# 2-core box next to a backlog (peers suite, 3 rounds each): TTFT P99 over serving alone
# 1.23-1.36x -> 0.96-1.15x, at a median 991 instead of 1,518 offline tok/s.
# `engine_options["offline_yield"]` overrides it (0 turns it off).
CPU_OFFLINE_YIELD = 1.0


class GPUWorker:
    """Use through `worker_actor()`; methods are called by the controller and the ingress."""

    def __init__(
        self,
        worker_id: str,
        model: str,
        redis_url: str,
        engine_options: dict[str, Any] | None = None,
        queue_options: dict[str, Any] | None = None,
    ) -> None:
        import torch

        # four threads share this process's GIL: the engine loop, the asyncio thread streaming
        # tokens out, the queue's I/O thread and the checkpoint shipper. At the default 5 ms
        # switch interval a token waiting to leave waits for a step's Python to yield.
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
        self.metrics = WorkerMetrics(worker_id)
        self.frozen_objects = freeze_heap()  # the model is loaded: no full GC walks it again
        self._steps_seen = 0
        self.started = time.time()
        self.loop = EngineLoop(
            self.engine,
            on_step=self._on_step,
            idle_tick_s=0.05,
            offline_yield=offline_yield,
            name=f"engine-{worker_id}",
        )
        self.offline.on_work = self.loop.wake  # shards leased while the loop idles: step them now

    def _on_step(self, outputs: list[RequestOutput]) -> None:
        """Runs on the loop thread after every step (and every idle tick)."""
        if self.engine.stats.steps != self._steps_seen:
            self._steps_seen = self.engine.stats.steps
            self.metrics.record_step(self.engine.last_step, outputs)
        self.offline.sync(outputs)

    async def generate(self, prompt_token_ids: list[int], params: dict[str, Any], request_id: str):
        """Streaming generator (call with num_returns="streaming"): one RequestOutput per step.

        Mid-stream items carry only the step's new tokens and text; the cumulative ones come
        with the finished output (sending them every step costs O(n^2) bytes per request).
        """
        stream: AsyncIterator[RequestOutput] = self.loop.generate(
            prompt_token_ids, SamplingParams(**params), request_id, "online", stream_text=True
        )
        try:
            async for out in stream:
                yield out if out.finished else replace(out, token_ids=[], text="")
        finally:
            await stream.aclose()  # the consumer went away: abort in the engine

    def abort(self, request_id: str) -> None:
        self.loop.abort(request_id)

    def set_offline(self, enabled: bool) -> None:
        """The controller's offline budget switch: off stops leasing new shards (running ones finish)."""
        self.offline.leasing = enabled

    def set_slo(self, ttft_s: float, tpot_s: float) -> None:
        """Online latency targets the engine sizes offline work against (from the controller)."""
        from harvest.engine.config import SLOConfig

        slo = self.engine.scheduler.config.slo
        SLOConfig(ttft_s=ttft_s, tpot_s=tpot_s)  # validate before touching the live one
        slo.ttft_s, slo.tpot_s = ttft_s, tpot_s

    def health(self, max_stall_s: float = 30.0) -> bool:
        return self.loop.healthy(max_stall_s)

    def stats(self) -> dict[str, Any]:
        s = self.loop.stats()
        s.update(
            worker_id=self.worker_id,
            pid=os.getpid(),
            node_id=ray.get_runtime_context().get_node_id(),
            offline_enabled=self.offline.leasing,
            shards=sorted(self.offline.shards),
            offline_inflight=self.offline.inflight_requests,
            kv_blocks_total=self.engine.block_manager.num_blocks,
            kv_blocks_used=self.engine.block_manager.num_used_blocks,
            max_model_len=self.engine.max_model_len,
            slo={
                "ttft_s": self.engine.scheduler.config.slo.ttft_s,
                "tpot_s": self.engine.scheduler.config.slo.tpot_s,
            },
            capacity_tokens=self.engine.capacity_tokens,
            gc_frozen_objects=self.frozen_objects,
            uptime_s=time.time() - self.started,
        )
        return s

    def pid(self) -> int:
        return os.getpid()

    def shutdown(self) -> None:
        """Give leased shards back (no attempt spent) and stop the loop."""
        self.offline.leasing = False
        self.loop.stop()
        self.offline.release_all()


def worker_actor(use_gpu: bool):
    """The Ray actor class: one GPU each, or one CPU worker when the cluster has no GPU."""
    resources = {"num_gpus": 1, "num_cpus": 1} if use_gpu else {"num_cpus": 1}
    return ray.remote(max_restarts=0, max_concurrency=1000, **resources)(GPUWorker)
