"""The offline side of a worker, and the local loop that drives it without Ray.

`OfflineWorker` holds the leased shards and speaks to Redis. It submits each shard's
requests through the engine client (`EngineClient`) with the shard as their sink: on the
engine's thread an output costs an assignment under a lock, a finished one its Result.
All Redis traffic (leasing shards while the engine has offline room, writing results and
progress, renewing leases, acking finished shards) runs on the worker's own I/O thread, so
a Redis round trip never sits between two engine steps: on a GPU server that would stretch
every online token; on a busy CPU box a round trip waits for a core and costs a
millisecond. `background=False` does the same work inline in `tick` (tests that want it
step by step).

The engine loop calls `tick()` after every step and every idle tick; leases are renewed
only while it does, so a wedged loop loses its shards even though the I/O thread is fine.

Redis failing (unreachable, READONLY after a failover, OOM, a script error) pauses the
offline side and nothing else: the I/O thread never dies. It keeps the results it could not
write, retries with capped exponential backoff for as long as it takes (every write is
fenced and idempotent, so re-sending is safe), and when Redis answers again it first renews
its leases, then goes on. `paused` says why it waits; the engine loop never sees an error.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import redis

from harvest.checkpoint.handle import CheckpointHandle
from harvest.protocol.engine_client import EngineClient, EngineLoopError
from harvest.protocol.types import RequestOutput
from harvest.queue.config import WorkerConfig
from harvest.queue.models import Progress
from harvest.queue.pause import Pause, describe_error
from harvest.queue.shard import Prepared, ShardRun, prefix_primers
from harvest.queue.store import JobStore

if TYPE_CHECKING:  # the engine pulls in torch: only run_local's caller has one
    from harvest.engine import Engine

log = logging.getLogger(__name__)


@dataclass
class QueueStats:
    """Where the time went: seconds in each kind of Redis call (I/O thread), the engine loop's
    own queue work (`loop_s`: the shards' output sinks) and the engine steps (`run_local`)."""

    seconds: dict[str, float] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    results_written: int = 0
    engine_s: float = 0.0
    loop_s: float = 0.0
    last_result_at: float = 0.0  # perf_counter() when the last result was written

    def add(self, kind: str, seconds: float) -> None:
        self.seconds[kind] = self.seconds.get(kind, 0.0) + seconds
        self.calls[kind] = self.calls.get(kind, 0) + 1

    @property
    def queue_s(self) -> float:
        return sum(self.seconds.values())


@dataclass
class HandBack:
    """What a drain gave back: shards released, requests taken out of the engine, their
    tokens generated so far and how many of those their KV checkpoints hold."""

    shards: int = 0
    requests: int = 0
    generated_tokens: int = 0
    checkpointed_tokens: int = 0
    seconds: float = 0.0  # from the drain's start until every shard was released


def make_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class OfflineWorker:
    """Leases shards into the engine behind `client`, writes their results; see the module docstring."""

    def __init__(
        self,
        store: JobStore,
        client: EngineClient,
        config: WorkerConfig | None = None,
        worker_id: str = "",
        *,
        background: bool = True,
    ) -> None:
        self.store = store
        self.client = client
        self.config = config or WorkerConfig()
        self.worker_id = worker_id or make_worker_id()
        self.leasing = True  # off: lease nothing new, finish what is held
        self.max_inflight = self.config.max_inflight_requests or 2 * client.limits.max_num_seqs
        self.shards: dict[str, ShardRun] = {}  # lease key "job/shard" -> run
        self.stats = QueueStats()
        self.queue_empty = False  # the last lease attempt found nothing
        self._lock = threading.Lock()  # shards and their runs: the loop routes, the I/O thread writes
        self._next_lease = 0.0
        self._shard_size = 1_000_000  # unknown until the first lease: ask for one shard
        self._last_renew = time.monotonic()
        self._last_progress = time.monotonic()
        self._last_flush = time.monotonic()
        self._loop_seen = time.monotonic()  # the engine loop's last tick
        self._pause: Pause | None = None  # set while Redis fails; only the I/O side touches it
        # lease key -> groups of a shard's prepared requests still to admit: first one request
        # of each group sharing a prefix (`prefix_primers`), then every other request with no
        # crash on record; each suspect (a request that was in a
        # crashed lease) follows alone, once the group before it has finished, so a request
        # that crashes the engine again takes only itself (and other shards' requests) down
        self._waiting: dict[str, list[list[Prepared]]] = {}
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        if background:
            self._thread = threading.Thread(
                target=self._io_loop, name=f"queue-io-{self.worker_id}", daemon=True
            )
            self._thread.start()

    @property
    def inflight_requests(self) -> int:
        return sum(len(run.running) for run in self.shards.values())

    @property
    def paused(self) -> str | None:
        """Why offline work waits ("Redis unreachable since ...: cause"); None while it runs."""
        pause = self._pause
        return pause.describe() if pause is not None else None

    def status(self) -> dict[str, Any]:
        """The offline side for a status view: shards held, requests in the engine, pause."""
        return {
            "offline_paused": self.paused,
            "shards": sorted(self.shards),
            "offline_inflight": self.inflight_requests,
            "io_thread_alive": self._thread is None or self._thread.is_alive(),
        }

    # ------------------------------------------------------------------ the engine loop's side

    def tick(self) -> None:
        """The engine loop is alive (called on it after every step and idle tick): leases may
        be renewed. Without the I/O thread, also this round's Redis work. Never raises
        because of Redis: see `paused`."""
        self._loop_seen = time.monotonic()
        if self._thread is None and not self._stopping.is_set():
            self.io_round()

    def _on_output(self, run: ShardRun, out: RequestOutput) -> None:
        """The sink of `run`'s requests, on the engine's thread."""
        start = time.perf_counter()
        finishing = run.on_output(out)
        self.stats.loop_s += time.perf_counter() - start
        if finishing and self._thread is not None:  # a shard's last result: write and ack it now
            self._wake.set()

    # ------------------------------------------------------------------ Redis (the I/O thread)

    def _io_loop(self) -> None:
        tick = max(0.005, min(self.config.result_flush_s or 0.01, self.config.idle_poll_s))
        while not self._stopping.is_set():
            self.io_round()
            self._wake.wait(tick)
            self._wake.clear()

    def io_round(self) -> None:
        """One round of Redis work; a failure pauses the offline side instead of raising."""
        pause = self._pause
        if pause is not None and not pause.due:
            return
        try:
            if pause is not None:
                self._resume(pause)
            self.fill()
            self.flush()
            self._admit_waiting()  # after flush: the group before is written, so not charged
        except Exception as exc:  # Redis's errors, and a bug here must not end offline work either
            self._paused(exc)

    def _paused(self, exc: Exception) -> None:
        """Log a pause once when it starts and when its cause changes, not at every retry."""
        trace = not isinstance(exc, redis.RedisError)  # a bug: show where
        if self._pause is None:
            self._pause = Pause.start(exc)
            log.warning("offline work paused (%s); results stay buffered, retrying with backoff",
                        self._pause.describe(), exc_info=trace)  # fmt: skip
        # a lease the queue extended across an outage has one visibility timeout of grace:
        # retry well within it
        elif self._pause.failed_again(exc, cap_s=self.config.visibility_timeout_s / 4):
            log.warning("offline work still paused, now because of %s", self._pause.cause, exc_info=trace)

    def _resume(self, pause: Pause) -> None:
        """Redis answers again: reload the scripts (a restarted Redis has none), renew the
        leases before anything else (one held across the outage got a visibility timeout of
        grace from the queue, see lua.heard), then carry on where the pause left off."""
        self.store.load_scripts()
        if time.monotonic() - self._loop_seen < self.config.visibility_timeout_s / 2:
            self._renew()
        self._pause = None
        log.warning("Redis is back after %.1f s; offline work resumes", time.time() - pause.since)

    def _timed(self, kind: str, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        try:
            return fn()
        finally:
            self.stats.add(kind, time.perf_counter() - start)

    def fill(self) -> int:
        """Lease shards while the engine has offline room; returns how many were leased."""
        cfg, leased = self.config, 0
        while self.leasing and time.monotonic() >= self._next_lease:
            with self._lock:
                inflight = self.inflight_requests
                if len(self.shards) >= cfg.max_shards or inflight >= self.max_inflight:
                    break
                # as many shards as fill the room, judged by the last shard's size: one round trip
                room = -(-(self.max_inflight - inflight) // self._shard_size)
                want = max(1, min(room, cfg.max_shards - len(self.shards)))
            leases = self._timed(
                "lease", lambda want=want: self.store.lease(self.worker_id, cfg.visibility_timeout_s, want)
            )
            if not leases:
                self._next_lease = time.monotonic() + cfg.idle_poll_s
                self.queue_empty = True
                break
            for lease in leases:
                self._shard_size = max(1, len(lease.requests))
                run = ShardRun(lease, self.client, self.worker_id, self._lock)
                prepared = run.prepare()  # tokenizing: off the lock
                suspects = [[p] for p in prepared if lease.crashes.get(p[1].index)]
                clean = [p for p in prepared if not lease.crashes.get(p[1].index)]
                # one request per shared prefix first, so the others find it in the prefix cache
                first = set(prefix_primers([p[1].prompt_ids for p in clean], self.client.limits.block_size))
                primers = [p for i, p in enumerate(clean) if i in first]
                rest = [p for i, p in enumerate(clean) if i not in first]
                with self._lock:
                    self.shards[lease.key] = run
                    self._waiting[lease.key] = [g for g in (primers, rest) if g] + suspects
                leased += 1
            self.queue_empty = False
            self._admit_waiting()
        return leased

    def _admit_waiting(self) -> None:
        """Record the next group of each shard as admitted (ADMIT), then submit it to the
        engine. A group waits until the one before it has finished and its results are
        written (a crash charges every admitted request without a stored result), and no
        request reaches the engine before the record of it is in Redis."""
        with self._lock:
            ready = [
                (key, run, groups[0])
                for key, groups in self._waiting.items()
                if groups
                and (run := self.shards.get(key)) is not None
                and not run.running
                and not run.results
            ]
        dropped = []
        for key, run, group in ready:
            indices = [p[1].index for p in group]
            reply = self._timed("admit", lambda lease=run.lease, i=indices: self.store.admit(lease, i))
            with self._lock:
                if key not in self.shards:  # dropped meanwhile
                    continue
                if reply != "ok":
                    dropped.append(self._drop(run, reply))
                    continue
                self._waiting[key].pop(0)
                run.expect(group)
            run.start(group, functools.partial(self._on_output, run))
        self._release_closed(dropped)

    def flush(self, force: bool = False) -> None:
        """Write results/progress, ack finished shards, renew leases (all safe to retry)."""
        self._write(force)
        self._ack_done()
        now = time.monotonic()
        # renewing proves the engine loop is alive: not while it has stopped calling tick
        loop_alive = now - self._loop_seen < self.config.visibility_timeout_s / 2
        if loop_alive and now - self._last_renew >= self.config.renew_interval_s:
            self._renew()

    def _write(self, force: bool = False) -> None:
        """One pipeline: results (every result_flush_s, at once when they finish a shard),
        progress (every progress_interval_s) and the acks of the shards these results finish."""
        cfg, now = self.config, time.monotonic()
        save = now - self._last_progress >= cfg.progress_interval_s
        with self._lock:
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
        start = time.perf_counter()  # encoding included: it is the queue's cost too
        try:
            with self.store.r.pipeline(transaction=False) as pipe:
                for run, results in batches:
                    self.store.write_results(run.lease, results, client=pipe)
                for run, p in progress:
                    self.store.save_progress(run.lease, p, client=pipe)
                for run in acks:  # runs after the writes above, so it sees them
                    self.store.ack(run.lease, client=pipe)
                replies = pipe.execute()
        except BaseException:
            with self._lock:
                for run, results in batches:  # not known to be written: keep them for the retry
                    run.results.update(results)
            raise
        finally:
            self.stats.add("write", time.perf_counter() - start)
        write_replies, rest = replies[: len(batches)], replies[len(batches) :]
        dropped: list[tuple[ShardRun, str]] = []
        with self._lock:
            for (run, results), reply in zip(batches, write_replies):
                if reply in ("lost", "closed"):
                    dropped.append(self._drop(run, reply))
                    continue
                run.mark_written(list(results))  # 'ok' or 'dup': either way the request has its one result
                self.stats.results_written += reply.count("ok")
                self.stats.last_result_at = time.perf_counter()
            for (run, _), reply in zip(progress, rest[: len(progress)]):
                if reply in ("lost", "closed") and run.lease.key in self.shards:
                    dropped.append(self._drop(run, reply))
            acked = [
                (run, reply)
                for run, reply in zip(acks, rest[len(progress) :])
                if run.lease.key in self.shards
            ]
        self._release_closed(dropped)
        for run, reply in acked:
            self._acked(run, self.store.after_ack(run.lease, reply))

    def _acked(self, run: ShardRun, status: str) -> None:
        """After ACK. A Redis error here leaves the shard held: the next round's ACK answers
        'lost' (it was done) or 'incomplete' again, and either way ends up here once more."""
        if status == "incomplete":  # a result went missing: spend the attempt, retry elsewhere
            self.store.fail(run.lease, "ack found requests without a result")
        with self._lock:
            self.shards.pop(run.lease.key, None)
            self._waiting.pop(run.lease.key, None)

    def _ack_done(self) -> None:
        """Ack shards that finished without a write this round (all done earlier, or a retry)."""
        with self._lock:
            done = [run for run in self.shards.values() if run.done]
        for run in done:
            self._acked(run, self._timed("ack", lambda run=run: self.store.ack(run.lease)))

    def _renew(self) -> None:
        self._last_renew = time.monotonic()
        with self._lock:
            runs = list(self.shards.values())
        with self.store.r.pipeline(transaction=False) as pipe:
            for run in runs:
                self.store.renew(run.lease, self.config.visibility_timeout_s, client=pipe)
            replies = self._timed("renew", pipe.execute)
        with self._lock:
            dropped = [self._drop(run, reply) for run, reply in zip(runs, replies) if reply != "ok"]
        self._release_closed(dropped)

    def _drop(self, run: ShardRun, why: str) -> tuple[ShardRun, str]:
        """Stop working on a shard: taken over ('lost') or its job cancelled/expired ('closed').
        Called with the lock held, which the engine loop also takes: the Redis side of it is
        `_release_closed`, after the lock is let go."""
        log.info("dropping shard %s: %s", run.lease.key, why)
        run.abort()
        self.shards.pop(run.lease.key, None)
        self._waiting.pop(run.lease.key, None)
        return run, why

    def _release_closed(self, dropped: list[tuple[ShardRun, str]]) -> None:
        for run, why in dropped:
            if why == "closed":
                self.store.release(run.lease)

    def hand_back(self, keep: Callable[[CheckpointHandle], CheckpointHandle] | None = None) -> HandBack:
        """Drain the offline side: lease nothing more, take the running requests out of the
        engine with their KV checkpoints, record how far each got (its token ids and its
        checkpoint, which `keep` may move to a store that outlives this node), write what
        finished and give every shard back without spending an attempt. The next holder
        resumes each request from that record. Called once, off the engine's thread."""
        start = time.monotonic()
        self.leasing = False
        self._stop_io()  # from here on only this thread writes: no older progress lands after ours
        with self._lock:
            self._waiting.clear()  # nothing more enters the engine
            runs = {rid: run for run in self.shards.values() for rid in run.running}
        report = HandBack()
        try:
            states = self.client.export(list(runs)) if runs else []
        except EngineLoopError:  # no engine: the recorded progress is what there is
            states = []
        saves: dict[str, tuple[ShardRun, dict[int, Progress]]] = {}
        for state in states:
            handle = state.checkpoint
            if handle is not None and keep is not None:
                try:
                    handle = keep(handle)
                except Exception:  # the checkpoint only saves work: the record stands without a move
                    log.exception("could not move the checkpoint of %s", state.request_id)
            with self._lock:
                req = runs[state.request_id].running.pop(state.request_id, None)
            if req is None:
                continue
            run = runs[state.request_id]
            tokens = state.token_ids[len(req.prompt_ids) :]  # resumed ones included
            saves.setdefault(run.lease.key, (run, {}))[1][req.index] = Progress(tokens, handle)
            report.requests += 1
            report.generated_tokens += len(tokens)
            report.checkpointed_tokens += handle.tokens if handle is not None else 0
        try:
            for run, progress in saves.values():
                self.store.save_progress(run.lease, progress)
        except redis.RedisError as exc:  # the release below fails too: the leases expire instead
            log.warning("could not record the progress of a drain (%s)", describe_error(exc))
        report.shards = len(self.shards)
        self.release_all()
        report.seconds = time.monotonic() - start
        return report

    def _stop_io(self) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)

    def release_all(self, crashed: bool = False) -> None:
        """Stop: write what is finished, then give the rest back. A graceful stop spends no
        attempt and charges no request; `crashed` (the engine loop died) counts as the crash it
        is: each shard spends its attempt and its admitted, unfinished requests are charged."""
        self._stop_io()
        try:
            if self._pause is not None:  # maybe back by now; a restarted Redis needs its scripts
                self.store.load_scripts()
            self._write(force=True)
            self._ack_done()
            with self._lock:
                runs, self.shards = list(self.shards.values()), {}
                self._waiting.clear()
            for run in runs:
                run.abort()
                if crashed:
                    self.store.fail(run.lease, f"the engine of worker {self.worker_id} died", crashed=True)
                else:
                    self.store.release(run.lease)
        except redis.RedisError as exc:
            log.warning("could not give shards back (%s); their leases will expire", describe_error(exc))
        self.shards.clear()


def run_local(
    store: JobStore,
    engine: Engine,
    config: WorkerConfig | None = None,
    *,
    stop: Callable[[], bool] | None = None,
    exit_when_idle: bool = False,
    worker_id: str = "",
    on_start: Callable[[OfflineWorker], None] | None = None,
) -> OfflineWorker:
    """Run `engine` in an `EngineLoop` and pull shards into it until `stop()` (or, with
    `exit_when_idle`, an empty queue); then give back what is unfinished. `on_start` gets
    the worker once it runs (to watch it). Raises what killed the engine loop, if anything.
    Host tuning (`DeviceProfile`) is the caller's: this runs in tests and benchmarks too."""
    from harvest.serving.engine_loop import EngineLoop  # torch: only a worker pays for it

    config = config or WorkerConfig()
    poll_s = min(config.idle_poll_s, 0.05)
    loop = EngineLoop(engine, idle_tick_s=poll_s, name=f"engine-{worker_id or 'local'}")
    worker = OfflineWorker(store, loop, config, worker_id)
    loop.on_step = lambda _outputs: worker.tick()
    if on_start is not None:
        on_start(worker)
    try:
        while not (stop is not None and stop()) and loop.running:  # `stop` is a predicate: polled
            if exit_when_idle and worker.queue_empty and not worker.shards:
                break
            time.sleep(poll_s)
    finally:
        loop.stop()  # no more outputs: what is written below is final
        worker.release_all()
        worker.stats.engine_s = loop.step_s
    if loop.error is not None:
        raise loop.error
    return worker
