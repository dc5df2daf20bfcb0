"""HarvestController: one named, detached, restartable actor that supervises the workers.

Its durable state is the service config in Redis, and the workers themselves are named
detached actors, so a restarted controller finds them again instead of starting new ones.
A monitor thread polls every worker a few times a second: it keeps the load view the
ingress routes by, switches offline leasing off on a worker that is missing its online
SLOs (the engine's own latency budget does the fine-grained work), tightens the SLO share
a worker's engine plans for when the latencies the ingress observes miss the SLO
(feedback.py), replaces dead workers and hands their shards back to the queue at once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from typing import Any

import ray

from actors.gpu_worker import worker_actor
from controller.feedback import SLOFeedback
from harvest.queue.store import JobStore

log = logging.getLogger(__name__)

CONTROLLER_NAME = "harvest-controller"
NAMESPACE = "harvest"
CONFIG_KEY = "harvest:service"


def worker_name(index: int) -> str:
    return f"harvest-worker-{index}"


class HarvestController:
    def __init__(self, config: dict[str, Any]) -> None:
        self.store = JobStore.from_url(config["redis_url"])
        stored = self.store.r.get(CONFIG_KEY)
        # a restarted controller gets its original config back from Redis
        self.config = json.loads(stored) if stored else config
        self.store.r.set(CONFIG_KEY, json.dumps(self.config))
        self.workers: dict[str, Any] = {}
        self.view: dict[str, dict[str, Any]] = {}
        self.deaths: list[dict[str, Any]] = []
        self.feedback: dict[str, SLOFeedback] = {}  # per worker: the share of the SLO its engine plans for
        self.started = time.time()
        self._lock = threading.Lock()
        for index in range(self.config["num_workers"]):
            self._ensure_worker(index)
        self._stop = threading.Event()
        self._monitor = threading.Thread(target=self._run, name="harvest-monitor", daemon=True)
        self._monitor.start()

    # ------------------------------------------------------------------ workers

    def _ensure_worker(self, index: int) -> Any:
        name = worker_name(index)
        try:
            handle = ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:
            cls = worker_actor(self.config.get("use_gpu", False))
            handle = cls.options(name=name, namespace=NAMESPACE, lifetime="detached").remote(
                name,
                self.config["model"],
                self.config["redis_url"],
                self.config.get("engine_options"),
                self.config.get("queue_options"),
            )
        with self._lock:
            self.workers[name] = handle
        return handle

    def _poll(self, name: str, handle: Any, timeout: float) -> dict[str, Any] | None:
        try:
            stats = ray.get(handle.stats.remote(), timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            return None  # busy or still loading the model: not dead
        except ray.exceptions.RayActorError:
            self._replace(name)
            return None
        return stats

    def _replace(self, name: str) -> None:
        returned = self.store.expire_worker(name)
        self.deaths.append({"worker": name, "time": time.time(), "shards_returned": returned})
        log.warning("worker %s died; %d shards back to the queue", name, returned)
        with self._lock:
            self.workers.pop(name, None)
            self.view.pop(name, None)
        self._ensure_worker(int(name.rsplit("-", 1)[1]))

    def _run(self) -> None:
        from ray.util.metrics import Gauge

        depth = Gauge("harvest_job_requests_pending", "Offline requests not yet finished, per job.", ("job",))
        period, last_jobs = self.config.get("monitor_period_s", 0.25), 0.0
        while not self._stop.wait(period):
            if time.monotonic() - last_jobs > 2.0:
                last_jobs = time.monotonic()
                for job in self.store.list_jobs(limit=100):
                    c = job.request_counts
                    depth.set(c.total - c.completed - c.failed, {"job": job.id})
            for name, handle in list(self.workers.items()):
                stats = self._poll(name, handle, timeout=max(1.0, 4 * period))
                if stats is None:
                    continue
                self._budget(name, handle, stats)
                self._retarget(name, handle)
                with self._lock:
                    self.view[name] = {**stats, "seen": time.time(), "slo_scale": self._scale(name)}

    def _budget(self, name: str, handle: Any, stats: dict[str, Any]) -> None:
        """Offline leasing on while the worker is healthy and not drowning in online work."""
        slo_tpot = self.config.get("engine_options", {}).get("slo", {}).get("tpot_s")
        step = stats.get("last_step", {})
        overloaded = (
            bool(slo_tpot)
            and step.get("online_running", 0) > 0
            and (step.get("measured_latency_s", 0.0) > 2 * slo_tpot)
        )
        enabled = stats.get("healthy", True) and not overloaded
        if enabled != stats.get("offline_enabled"):
            handle.set_offline.remote(enabled)

    def _slo(self) -> dict[str, float] | None:
        return self.config.get("engine_options", {}).get("slo")

    def _scale(self, name: str) -> float:
        fb = self.feedback.get(name)
        return fb.scale if fb is not None else 1.0

    def _retarget(self, name: str, handle: Any) -> None:
        """Tighten or relax what the worker's engine plans for, from what the ingress observed."""
        slo, fb = self._slo(), self.feedback.get(name)
        if slo and fb is not None and (scale := fb.update(slo["ttft_s"], slo["tpot_s"])) is not None:
            handle.set_slo.remote(slo["ttft_s"] * scale, slo["tpot_s"] * scale)

    # ------------------------------------------------------------------ API

    def observe(self, samples: dict[str, dict[str, list[float]]]) -> None:
        """Online latencies the ingress saw per worker: {name: {"ttft_s": [...], "tpot_s": [...]}}."""
        with self._lock:
            for name, s in samples.items():
                if name in self.workers:
                    self.feedback.setdefault(name, SLOFeedback()).observe(s["ttft_s"], s["tpot_s"])

    def route(self) -> list[str]:
        """Worker names, most online headroom first (fewest online requests, emptiest KV)."""
        with self._lock:
            view = dict(self.view)
            names = list(self.workers)

        def load(name: str) -> tuple[float, float]:
            s = view.get(name)
            if s is None or not s.get("healthy", True):
                return (float("inf"), 1.0)
            step = s.get("last_step", {})
            online = (
                step.get("online_running", 0) + step.get("online_waiting", 0) + s.get("pending_online", 0)
            )
            return (online, s.get("kv_blocks_used", 0) / max(1, s.get("kv_blocks_total", 1)))

        return sorted(names, key=load)

    def set_slo(self, ttft_s: float, tpot_s: float) -> None:
        """Publish new online SLO targets to every worker (and keep them for restarts)."""
        slo = {"ttft_s": ttft_s, "tpot_s": tpot_s}
        self.config.setdefault("engine_options", {})["slo"] = slo
        self.store.r.set(CONFIG_KEY, json.dumps(self.config))
        workers = list(self.workers.items())
        ray.get([h.set_slo.remote(ttft_s * self._scale(n), tpot_s * self._scale(n)) for n, h in workers])

    def worker(self, name: str) -> Any:
        return self.workers[name]

    def status(self) -> dict[str, Any]:
        with self._lock:
            view = {name: dict(s) for name, s in self.view.items()}
        jobs = [j.to_dict() for j in self.store.list_jobs(limit=20)]
        return {
            "config": self.config,
            "workers": view,
            "deaths": list(self.deaths),
            "jobs": jobs,
            "uptime_s": time.time() - self.started,
        }

    def ready(self) -> bool:
        """True once every worker answered a poll."""
        with self._lock:
            return len(self.view) >= self.config["num_workers"]

    def shutdown(self) -> None:
        """Stop every worker (shards given back) and forget the stored config."""
        self._stop.set()
        for handle in list(self.workers.values()):
            with contextlib.suppress(Exception):  # a dead worker's shards come back when leases expire
                ray.get(handle.shutdown.remote(), timeout=30)
            ray.kill(handle)
        self.store.r.delete(CONFIG_KEY)


def controller_actor():
    return ray.remote(num_cpus=0, max_restarts=-1, max_concurrency=16)(HarvestController)
