"""HarvestController: one named, detached, restartable actor that supervises the workers.

Serve starts the workers (one replica each, restarted when they die); each reports its
stats to the controller a few times a second (less often in a fleet of hundreds, so that
the controller's share of a core stays small: `heartbeat_period`) and gets its orders in the answer: offline
leasing on or off (off on a worker that is unhealthy or drowning in online work; the
engine's own latency budget does the fine-grained work) and the online SLO. A worker
whose reports stop is asked whether it is still alive; a dead one's shards go back to
the queue at once, before its leases would expire. The durable state, the service
config, lives in Redis, and the workers find a restarted controller by name, so a
restart loses nothing: the view fills again with the next reports.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import ray
import redis

from controller.config_store import ConfigStore, public_settings
from harvest.queue.models import Job, JobStatus
from harvest.queue.store import JobStore, connect
from harvest.redact import redact_url

log = logging.getLogger(__name__)

# time left to a job's deadline -> the `due_within` bucket its unfinished requests count in
DUE_WITHIN = (("30m", 1800), ("1h", 3600), ("6h", 6 * 3600), ("24h", 86400), ("7d", 7 * 86400))


def due_within(expires_at: float | None, now: float) -> str:
    """The smallest bucket holding a deadline (an overdue one is in the first); "later" past
    the last, "none" for a job without a completion window."""
    if expires_at is None:
        return "none"
    left = expires_at - now
    return next((name for name, seconds in DUE_WITHIN if left <= seconds), "later")


def queued_by_deadline(jobs: list[Job], now: float) -> dict[str, int]:
    """Unfinished requests of in-progress jobs, by how soon they are due."""
    depth = dict.fromkeys([*(name for name, _ in DUE_WITHIN), "later", "none"], 0)
    for job in jobs:
        if job.status is JobStatus.IN_PROGRESS:
            c = job.request_counts
            depth[due_within(job.expires_at, now)] += c.total - c.finished
    return depth


def shown_config(config: dict[str, Any]) -> dict[str, Any]:
    """The service config as `status()` shows it: the Redis password and the API key masked."""
    shown = public_settings(config)
    if "redis_url" in config:
        shown["redis_url"] = redact_url(config["redis_url"])
    shown["api_key"] = "***" if config.get("api_key") else None
    return shown


class HarvestController:
    def __init__(self, config: dict[str, Any]) -> None:
        client = connect(config["redis_url"])  # one connection pool for both stores
        self.store = JobStore(client)
        self.config_store = ConfigStore(client)
        # a restarted controller gets its config back from Redis (with later changes such as a
        # new SLO); the secrets, never stored there, from its arguments
        self.config = {**config, **self.config_store.get()}
        self.config_store.put(self.config)
        self.period_s = self.config.get("monitor_period_s", 0.25)
        # the fleet's heartbeats, all together, at most this often: each costs the controller
        # a Ray call, 0.45 ms of its core for an empty one on the 2-core CI box (0.1-0.2 ms on
        # a fast host), so past `max_heartbeats_per_s` x period workers each one reports less
        # often than every period (see `heartbeat_period`). 110 keeps the controller under a
        # tenth of a core on the slow box whatever the fleet (BENCHMARKS, scale: 150 gave 0.13)
        self.max_heartbeats_per_s = self.config.get("max_heartbeats_per_s", 110.0)
        self.view: dict[str, dict[str, Any]] = {}  # worker -> its last report, and when it came
        self.actors: dict[str, Any] = {}  # worker -> its replica's actor handle (liveness)
        self.drains: dict[str, dict[str, Any]] = {}  # worker -> its drain order, until it leaves
        self.deaths: list[dict[str, Any]] = []
        self.redis_error: str | None = None  # why the monitor's last round failed (it retries)
        self._last_jobs = 0.0  # monotonic time of the last job sweep
        self.offline_requests_pending: int | None = None  # over all jobs, as of the last sweep
        self.queued_by_deadline: dict[str, int] = {}  # ... of those in progress, by how soon due
        self.tenants: dict[str, dict[str, float]] = {}  # tenant -> harvested/served tokens, device seconds
        self.started = time.time()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._monitor = threading.Thread(target=self._run, name="harvest-monitor", daemon=True)
        self._monitor.start()

    # ------------------------------------------------------------------ workers

    @ray.method(concurrency_group="heartbeats")
    def heartbeat(self, name: str, stats: dict[str, Any], actor: Any = None) -> dict[str, Any]:
        """A worker's report; the answer is what it should do now, and when to report next.

        `actor`, the worker's handle (to ask a silent worker whether it lives), comes only
        while the answer's `send_handle` asks for it: once, and again after a controller
        restart. Deserializing a handle costs a call a quarter more, every call."""
        with self._lock:
            self.view[name] = {**stats, "seen": time.time()}
            if actor is not None:
                self.actors[name] = actor
            send_handle = name not in self.actors
        slo = self._slo()
        target = (slo["ttft_s"], slo["tpot_s"]) if slo else None
        return {
            "offline": self._offline_allowed(stats),
            "slo": target,
            "period_s": self.heartbeat_period(),
            "drain": self.drains.get(name),
            "send_handle": send_handle,
        }

    def heartbeat_period(self) -> float:
        """Seconds between a worker's heartbeats: the monitor period while the fleet is small,
        longer once its reports would pass `max_heartbeats_per_s` (1,000 workers: 9.1 s)."""
        return max(self.period_s, len(self.view) / self.max_heartbeats_per_s)

    def _offline_allowed(self, stats: dict[str, Any]) -> bool:
        """Offline leasing on while the worker is healthy and not drowning in online work."""
        slo = self._slo()
        step = stats.get("last_step", {})
        overloaded = (
            slo is not None
            and step.get("online_running", 0) > 0
            and step.get("measured_latency_s", 0.0) > 2 * slo["tpot_s"]
        )
        return bool(stats.get("healthy", True)) and not overloaded

    def _slo(self) -> dict[str, float] | None:
        return self.config.get("engine_options", {}).get("slo")

    def _check_silent(self) -> None:
        """A worker silent for a while is asked if it lives; a dead one's shards go back."""
        cutoff = time.time() - 4 * self.heartbeat_period()
        with self._lock:
            silent = [(n, self.actors.get(n)) for n, s in self.view.items() if s["seen"] < cutoff]
        for name, actor in silent:
            if actor is None:
                continue  # reported once, without its handle yet: the next report brings it
            try:
                ray.get(actor.__ray_ready__.remote(), timeout=1.0)
            except ray.exceptions.GetTimeoutError:
                continue  # busy, not dead
            except ray.exceptions.RayActorError:
                self._forget(name, died=True)

    def _forget(self, name: str, died: bool) -> None:
        with self._lock:
            if name not in self.view:
                return
        if died:  # first: should Redis fail, the worker stays in the view and the next round retries
            returned = self.store.expire_worker(name)
            self.deaths.append({"worker": name, "time": time.time(), "shards_returned": returned})
            log.warning("worker %s died; %d shards back to the queue", name, returned)
        with self._lock:
            self.view.pop(name, None)
            self.actors.pop(name, None)
            self.drains.pop(name, None)

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self.monitor_round()

    def monitor_round(self) -> None:
        """One round of the monitor thread. A Redis error ends the round, never the thread: it
        is logged when it starts or changes, and the next round (one period later) retries."""
        try:
            if time.monotonic() - self._last_jobs > 2.0:
                # a sweep: finalizing jobs complete, overdue ones expire and retired ones leave
                # the job list even while no client looks and no worker leases
                self.store.sweep()
                jobs = self.store.list_jobs(limit=100)
                self.offline_requests_pending = sum(j.request_counts.total - j.request_counts.finished
                                                    for j in jobs)  # fmt: skip
                self.queued_by_deadline = queued_by_deadline(jobs, self.store.now())
                self.tenants = self.store.tenant_usage()  # the workers' /metrics export these
                self._last_jobs = time.monotonic()
            self._check_silent()
        except redis.RedisError as exc:
            cause = f"{type(exc).__name__}: {exc}"
            if cause != self.redis_error:
                log.warning("monitor: Redis failed (%s); retrying every %.2f s", cause, self.period_s)
            self.redis_error = cause
            return
        if self.redis_error is not None:
            log.warning("monitor: Redis is back")
            self.redis_error = None

    # ------------------------------------------------------------------ API

    def set_slo(self, ttft_s: float, tpot_s: float, timeout_s: float = 10.0) -> bool:
        """New online SLO targets for every worker (kept for restarts); True once every
        worker reported them, which takes one heartbeat."""
        self.config.setdefault("engine_options", {})["slo"] = {"ttft_s": ttft_s, "tpot_s": tpot_s}
        self.config_store.put(self.config)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                targets = [s.get("slo_target") for s in self.view.values()]
            if all(t == [ttft_s, tpot_s] for t in targets):
                return True
            time.sleep(self.period_s / 4)
        return False

    def drain(self, target: str, reason: str = "harvest drain") -> dict[str, Any]:
        """Drain a worker, or every worker on a node (its id, or a prefix of it naming one
        node): each stops taking work, hands its offline requests back with their KV
        checkpoints shipped to a node that stays, finishes its online requests and leaves
        (GPUWorker.drain). The order reaches a worker with its next heartbeat. Idempotent;
        an unknown target is a ValueError naming the workers and nodes there are."""
        with self._lock:
            nodes = {name: s.get("node_id") or "" for name, s in self.view.items()}
            if target in nodes:
                names = [target]
            else:
                matched = {node for node in nodes.values() if target and node.startswith(target)}
                if len(matched) > 1:
                    raise ValueError(f"{target!r} names {len(matched)} nodes: give more of the node id")
                names = [name for name, node in nodes.items() if node in matched]
            if not names:
                raise ValueError(f"no worker or node {target!r}; workers: {sorted(nodes)}, "
                                 f"nodes: {sorted(set(nodes.values()))}")  # fmt: skip
            leaving = {nodes.get(name) for name in [*names, *self.drains]}
            keeper_node = self._keeper_node(leaving, nodes)
            for name in names:
                self.drains.setdefault(name, {"reason": reason, "keeper_node": keeper_node})
            order = self.drains[names[0]]
        log.warning("draining %s (%s); checkpoints to node %s", names, reason, order["keeper_node"])
        return {"workers": names, "order": order}

    def _keeper_node(self, leaving: set[str | None], nodes: dict[str, str]) -> str | None:
        """Where a draining worker ships its checkpoints: this controller's node (the head,
        normally: no spot capacity), else a node of a worker that is not draining; None (the
        worker's own node) when every node is leaving."""
        here = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
        candidates = [here, *(node for name, node in nodes.items() if name not in self.drains)]
        return next((node for node in candidates if node and node not in leaving), None)

    def leave(self, name: str) -> None:
        """A worker shutting down, its shards already given back."""
        self._forget(name, died=False)

    def status(self) -> dict[str, Any]:
        with self._lock:
            view = {name: dict(s) for name, s in self.view.items()}
        try:
            listed = self.store.list_jobs(limit=20)
            usage = self.store.job_usage(j.id for j in listed)
            jobs = [{**j.to_dict(), **usage[j.id]} for j in listed]
        except redis.RedisError:
            jobs = []  # the workers' view still stands; `redis_error` says why no jobs
        return {
            "config": shown_config(self.config),
            "workers": view,
            "deaths": list(self.deaths),
            "jobs": jobs,
            "redis_error": self.redis_error,
            "offline_requests_pending": self.offline_requests_pending,
            "queued_by_deadline": dict(self.queued_by_deadline),
            "tenants": {tenant: dict(tokens) for tenant, tokens in self.tenants.items()},
            "uptime_s": time.time() - self.started,
        }

    def ready(self) -> bool:
        """True once every worker reported."""
        with self._lock:
            return len(self.view) >= self.config["num_workers"]

    def shutdown(self) -> None:
        """Stop supervising and forget the stored config (Serve stops the workers)."""
        self._stop.set()
        self.config_store.clear()


def controller_actor():
    # no task events: each worker's heartbeats (4 a second) would pile up in the GCS.
    # Heartbeats never block, so one thread serves them all: more would only contend for the
    # GIL and Ray's deserialization lock. The other calls (status, set_slo waiting for the
    # workers' reports) run on their own threads and never hold the heartbeats up.
    return ray.remote(
        num_cpus=0,
        max_restarts=-1,
        max_concurrency=16,
        concurrency_groups={"heartbeats": 1},
        enable_task_events=False,
    )(HarvestController)
