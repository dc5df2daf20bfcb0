"""The offline side of a worker, and the local loop that drives it without Ray.

`OfflineWorker` holds the leased shards and speaks to Redis: `fill()` leases shards while
the engine has room, `sync(outputs)` routes one step's outputs to their shards and then
writes results, saves progress, renews leases and acks finished shards. It owns no loop:
the Ray worker calls the same two methods around `engine.step()` while it also serves
online requests; `run_local` is the loop for `harvest work --local` and tests.

Leases are renewed from the loop, not from a side thread, so a renewal also proves that
the loop still makes progress: a wedged worker loses its shards.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import redis

from harvest.queue.config import WorkerConfig
from harvest.queue.shard import ShardRun
from harvest.queue.store import JobStore

if TYPE_CHECKING:
    from harvest.engine import RequestOutput

log = logging.getLogger(__name__)
# NoScriptError: Redis restarted (empty script cache) between loading scripts and running a pipeline
REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError, redis.exceptions.NoScriptError)


@dataclass
class QueueStats:
    """Where the worker's time went: seconds in each kind of Redis call, and in the engine."""

    seconds: dict[str, float] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    results_written: int = 0
    engine_s: float = 0.0

    def add(self, kind: str, seconds: float) -> None:
        self.seconds[kind] = self.seconds.get(kind, 0.0) + seconds
        self.calls[kind] = self.calls.get(kind, 0) + 1

    @property
    def queue_s(self) -> float:
        return sum(self.seconds.values())


def make_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class OfflineWorker:
    """Leases shards into `engine`, writes their results; see the module docstring."""

    def __init__(self, store: JobStore, engine: Any, config: WorkerConfig | None = None, worker_id: str = ""):
        self.store = store
        self.engine = engine
        self.config = config or WorkerConfig()
        self.worker_id = worker_id or make_worker_id()
        self.shards: dict[str, ShardRun] = {}  # lease key "job/shard" -> run
        self.stats = QueueStats()
        self.queue_empty = False  # the last lease attempt found nothing
        self._next_lease = 0.0
        self._shard_size = 1_000_000  # unknown until the first lease: ask for one shard
        self._last_renew = time.monotonic()
        self._last_progress = time.monotonic()
        self._last_flush = time.monotonic()
        self._down_since: float | None = None

    @property
    def inflight_requests(self) -> int:
        return sum(len(run.running) for run in self.shards.values())

    def owns(self, request_id: str) -> bool:
        return request_id.rsplit("/", 1)[0] in self.shards

    def _timed(self, kind: str, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        try:
            return fn()
        finally:
            self.stats.add(kind, time.perf_counter() - start)

    def _redis_down(self, exc: Exception) -> None:
        if isinstance(exc, redis.exceptions.NoScriptError):  # restarted: its script cache is empty
            with contextlib.suppress(*REDIS_DOWN):
                self.store.load_scripts()
        now = time.monotonic()
        if self._down_since is None:
            log.warning("Redis unreachable (%s); keeping results buffered and retrying", exc)
            self._down_since = now
        elif now - self._down_since > self.config.reconnect_timeout_s:
            raise exc
        self._next_lease = now + self.config.idle_poll_s

    # ------------------------------------------------------------------ verbs

    def fill(self) -> int:
        """Lease shards while the engine has offline room; returns how many were leased."""
        cfg, leased = self.config, 0
        if time.monotonic() < self._next_lease:
            return 0
        while len(self.shards) < cfg.max_shards and self.inflight_requests < cfg.max_inflight_requests:
            # as many shards as fill the room, judged by the last shard's size: one round trip
            room = -(-(cfg.max_inflight_requests - self.inflight_requests) // self._shard_size)
            want = max(1, min(room, cfg.max_shards - len(self.shards)))
            try:
                leases = self._timed(
                    "lease",
                    lambda want=want: self.store.lease(self.worker_id, cfg.visibility_timeout_s, want),
                )
            except REDIS_DOWN as exc:
                self._redis_down(exc)
                return leased
            self._down_since = None
            self.queue_empty = not leases
            if not leases:
                self._next_lease = time.monotonic() + cfg.idle_poll_s
                break
            for lease in leases:
                self._shard_size = max(1, len(lease.requests))
                run = ShardRun(lease, self.engine, self.worker_id)
                run.start()
                self.shards[lease.key] = run
                leased += 1
        return leased

    def sync(self, outputs: list[RequestOutput] = ()) -> None:
        """Route outputs, then write results/progress, renew and ack (all safe to retry)."""
        for out in outputs:
            run = self.shards.get(out.request_id.rsplit("/", 1)[0])
            if run is not None:
                run.on_output(out)
        try:
            self._write()
            self._ack_done()
            if time.monotonic() - self._last_renew >= self.config.renew_interval_s:
                self._renew()
            self._down_since = None
        except REDIS_DOWN as exc:
            self._redis_down(exc)

    def _write(self, force: bool = False) -> None:
        """One pipeline: results (every result_flush_s, at once when they finish a shard),
        progress (every progress_interval_s) and the acks of the shards these results finish."""
        cfg, now = self.config, time.monotonic()
        save = now - self._last_progress >= cfg.progress_interval_s
        finishing = any(run.results and not run.running for run in self.shards.values())
        if not (force or save or finishing or now - self._last_flush >= cfg.result_flush_s):
            return
        batches = [(run, run.take_results()) for run in list(self.shards.values()) if run.results]
        progress = [(run, run.progress_updates()) for run in self.shards.values()] if save else []
        progress = [(run, p) for run, p in progress if p]
        acks = [run for run, results in batches if not run.running and run.pending <= results.keys()]
        self._last_flush = now
        if save:
            self._last_progress = now
        if not batches and not progress:
            return
        try:
            with self.store.r.pipeline(transaction=False) as pipe:
                for run, results in batches:
                    self.store.write_results(run.lease, results, client=pipe)
                for run, p in progress:
                    self.store.save_progress(run.lease, p, client=pipe)
                for run in acks:  # runs after the writes above, so it sees them
                    self.store.ack(run.lease, client=pipe)
                replies = self._timed("write", pipe.execute)
        except BaseException:
            for run, results in batches:  # not known to be written: keep them for the retry
                run.results.update(results)
            raise
        write_replies, rest = replies[: len(batches)], replies[len(batches) :]
        for (run, results), reply in zip(batches, write_replies):
            if reply in ("lost", "closed"):
                self._drop(run, reply)
                continue
            run.mark_written(list(results))  # 'ok' or 'dup': either way the request has its one result
            self.stats.results_written += reply.count("ok")
        for (run, _), reply in zip(progress, rest[: len(progress)]):
            if reply == "lost":
                self._drop(run, reply)
        for run, reply in zip(acks, rest[len(progress) :]):
            if run.lease.key in self.shards:
                self._acked(run, self.store.after_ack(run.lease, reply))

    def _acked(self, run: ShardRun, status: str) -> None:
        if status == "incomplete":  # a result went missing: spend the attempt, retry elsewhere
            self.store.fail(run.lease, "ack found requests without a result")
        self.shards.pop(run.lease.key, None)

    def _ack_done(self) -> None:
        """Ack shards that finished without a write this round (all done earlier, or a retry)."""
        for key, run in list(self.shards.items()):
            if run.done and key in self.shards:
                self._acked(run, self._timed("ack", lambda run=run: self.store.ack(run.lease)))

    def _renew(self) -> None:
        self._last_renew = time.monotonic()
        runs = list(self.shards.values())
        with self.store.r.pipeline(transaction=False) as pipe:
            for run in runs:
                self.store.renew(run.lease, self.config.visibility_timeout_s, client=pipe)
            replies = self._timed("renew", pipe.execute)
        for run, reply in zip(runs, replies):
            if reply != "ok":
                self._drop(run, reply)

    def _drop(self, run: ShardRun, why: str) -> None:
        """Stop working on a shard: taken over ('lost') or its job cancelled/expired ('closed')."""
        log.info("dropping shard %s: %s", run.lease.key, why)
        run.abort()
        self.shards.pop(run.lease.key, None)
        if why == "closed":
            self.store.release(run.lease)

    def release_all(self) -> None:
        """Graceful stop: write what is finished, give the rest back without spending attempts."""
        try:
            self._write(force=True)
            self._ack_done()
            for run in list(self.shards.values()):
                run.abort()
                self.store.release(run.lease)
        except REDIS_DOWN as exc:
            log.warning("could not give shards back (%s); their leases will expire", exc)
        self.shards.clear()


def run_local(
    store: JobStore,
    engine: Any,
    config: WorkerConfig | None = None,
    *,
    stop: Callable[[], bool] | None = None,
    exit_when_idle: bool = False,
    worker_id: str = "",
) -> OfflineWorker:
    """Pull shards and run them until `stop()` (or, with `exit_when_idle`, an empty queue)."""
    worker = OfflineWorker(store, engine, config, worker_id)
    try:
        while not (stop is not None and stop()):
            worker.fill()
            outputs: list[RequestOutput] = []
            if engine.has_unfinished():
                start = time.perf_counter()
                outputs = engine.step()
                worker.stats.engine_s += time.perf_counter() - start
            worker.sync(outputs)
            if not worker.shards and not engine.has_unfinished():
                if exit_when_idle and worker.queue_empty:
                    break
                time.sleep(worker.config.idle_poll_s)  # idle: the next fill() polls the queue again
    finally:
        worker.release_all()
    return worker
