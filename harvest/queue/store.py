"""JobStore: the Redis job store. Every state change is one Lua script (see lua.py)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

import orjson
import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from harvest.protocol.sampling_params import SamplingParams
from harvest.queue import lua
from harvest.queue.config import JobOptions
from harvest.queue.errors import JobNotFoundError, RedisUnavailableError
from harvest.queue.models import Job, JobStatus, Lease, Progress, Result
from harvest.queue.redis_checks import check_server

SWEEP_LIMIT = 64  # expired leases reclaimed per call: keeps each script short
DEFAULT_JOB_TTL_S = 7 * 86400  # finished jobs are kept this long unless the store says otherwise
DEFAULT_MAX_TOKENS = SamplingParams.max_tokens
RATE_WINDOW_S = 300.0  # the recent throughput an ETA is judged by


def estimated_tokens(request: dict[str, Any]) -> int:
    """What a request will cost before it runs, charged to its tenant at lease time (the result's
    real token count replaces it): about 4 characters per prompt token, plus `max_tokens`."""
    prompt = request.get("prompt")
    if request.get("messages") is not None:
        prompt = json.dumps(request["messages"])
    prompt_tokens = len(prompt) // 4 if isinstance(prompt, str) else len(prompt or ())  # text or ids
    return prompt_tokens + int(request.get("params", {}).get("max_tokens", DEFAULT_MAX_TOKENS))


def _rate_buckets(now_ms: float, window_s: float) -> list[int]:
    """The P:rate buckets (see lua.py) of the last `window_s`, oldest first."""
    current = int(now_ms // lua.RATE_BUCKET_MS)
    return list(range(current - int(window_s * 1000 // lua.RATE_BUCKET_MS) + 1, current + 1))


def _rates(now_ms: float, buckets: list[int], counts: list[list[str | None]]) -> tuple[float, float] | None:
    """(requests/s, tokens/s) from the buckets' (r, t) counts, over the time since the first
    bucket with results; None when none has any."""
    seen = [(b, int(r), int(t or 0)) for b, (r, t) in zip(buckets, counts, strict=True) if r]
    if not seen:
        return None
    span_s = max((now_ms - seen[0][0] * lua.RATE_BUCKET_MS) / 1000, lua.RATE_BUCKET_MS / 1000)
    return sum(r for _, r, _ in seen) / span_s, sum(t for _, _, t in seen) / span_s


def _class_end_ms(deadline_s: float) -> int:
    """The end of the deadline class (see LEASE) that a job due at `deadline_s` is leased in."""
    return -(-int(deadline_s * 1000) // lua.CLASS_STEP_MS) * lua.CLASS_STEP_MS


def _unfinished(rows: list[list[str | None]]) -> int:
    """Requests without a result, from jobs' (total, completed, failed) counters."""
    return sum(int(t or 0) - int(c or 0) - int(f or 0) for t, c, f in rows)


def connect(url: str) -> redis.Redis:
    """A client that retries briefly on dropped connections; raises RedisUnavailableError, or
    RedisConfigError for a server that would lose or never run jobs (see redis_checks.py)."""
    client = redis.Redis.from_url(
        url,
        decode_responses=True,
        socket_connect_timeout=2,
        socket_timeout=30,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.02), 3),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
    )
    try:
        client.ping()
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise RedisUnavailableError(url, exc) from exc
    check_server(client, url)
    return client


# the Lua scripts of harvest/queue/lua.py this store runs, each loaded once per client
SCRIPT_NAMES = (
    "ACTIVATE",
    "LEASE",
    "RENEW",
    "WRITE_RESULTS",
    "SAVE_PROGRESS",
    "ACK",
    "FAIL",
    "RELEASE",
    "SWEEP",
    "FINALIZE",
    "CANCEL",
    "REJECT",
    "EXPIRE_WORKER",
    "VALIDATING",
    "ADMIT",
    "PURGE",
    "ADD_SHARDS",
    "CREATE",
)


class JobStore:
    """Jobs, shards, leases, progress and results in one Redis, under `prefix`."""

    def __init__(
        self, client: redis.Redis, prefix: str = "harvest", submitter_timeout_s: float = 60.0
    ) -> None:
        self.r = client
        self.prefix = prefix
        # a job left in validating this long without its submitter's heartbeat fails at a sweep
        self.submitter_timeout_ms = int(submitter_timeout_s * 1000)
        self._scripts = {
            name: client.register_script(lua.PRELUDE + getattr(lua, name)) for name in SCRIPT_NAMES
        }
        self.load_scripts()

    @classmethod
    def from_url(cls, url: str, prefix: str = "harvest", **kwargs: Any) -> JobStore:
        return cls(connect(url), prefix, **kwargs)

    def _run(self, name: str, *args: Any, client: Any = None) -> Any:
        if client is None:  # a Script call reloads the script itself after a Redis restart
            return self._scripts[name](args=[self.prefix, *args], client=self.r)
        # in a pipeline, a Script call would first ask SCRIPT EXISTS: one extra round trip per
        # write; plain EVALSHA instead, and after a restart the caller sees NoScriptError and
        # calls load_scripts() before retrying
        return client.evalsha(self._scripts[name].sha, 0, self.prefix, *args)

    def load_scripts(self) -> None:
        for script in self._scripts.values():
            script.sha = self.r.script_load(script.script)

    def job_key(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def shard_key(self, job_id: str, shard: int) -> str:
        return f"{self.prefix}:job:{job_id}:shard:{shard}"

    # ------------------------------------------------------------------ submitting

    def create_job(self, options: JobOptions) -> str:
        """Write a job record in `validating`; no shard of it can be leased yet."""
        job_id = f"batch_{uuid.uuid4().hex[:20]}"
        record = {
            "id": job_id,
            "name": options.name,
            "model": options.model,
            "owner": options.owner,
            "defaults": json.dumps(options.defaults),
            "metadata": json.dumps(options.metadata),
            "shard_size": options.shard_size,
            "max_attempts": options.max_attempts,
            "completion_window_ms": int((options.completion_window_s or 0) * 1000),
            "total": 0,
            "completed": 0,
            "failed": 0,
            "num_shards": 0,
            "shards_finished": 0,
            "leased": 0,
        }
        self._run("CREATE", job_id, self.submitter_timeout_ms, *[x for pair in record.items() for x in pair])
        return job_id

    def still_validating(self, job_id: str) -> str:
        """The submitter's heartbeat: without one for `submitter_timeout_s`, a sweep fails the job.

        Returns the job's status: anything but 'validating' means the submission is over
        (cancelled, or failed by a sweep) and the submitter should stop.
        """
        return self._run("VALIDATING", job_id, self.submitter_timeout_ms)

    def add_shards(self, job_id: str, shards: Iterable[list[dict[str, Any]]], first: int) -> str:
        """Write shards numbered from `first` in one script; 'ok', or the job's status when it is no
        longer validating (cancelled or failed meanwhile: nothing was written)."""
        args: list[Any] = []
        for requests in shards:
            costs = [estimated_tokens(r) for r in requests]
            args += [len(requests), orjson.dumps(requests), orjson.dumps(costs)]
        return self._run("ADD_SHARDS", job_id, first, *args)

    def activate(self, job_id: str) -> JobStatus:
        """validating -> in_progress: its shards become leasable and its window starts."""
        status = JobStatus(self._run("ACTIVATE", job_id))
        if status is JobStatus.FINALIZING:
            status = JobStatus(self._run("FINALIZE", job_id))
        return status

    def reject(self, job_id: str, errors: list[dict[str, Any]], num_errors: int) -> JobStatus:
        """validating -> failed with `errors`; a job never queued also loses the shards written for it."""
        return JobStatus(self._run("REJECT", job_id, json.dumps(errors), num_errors))

    # ------------------------------------------------------------------ reading jobs

    def get_job(self, job_id: str) -> Job:
        h = self.r.hgetall(self.job_key(job_id))
        if not h:
            raise JobNotFoundError(job_id)
        return Job.from_hash(h)

    def list_jobs(self, limit: int = 100) -> list[Job]:
        """Newest first."""
        ids = self.r.zrevrange(f"{self.prefix}:jobs", 0, limit - 1)
        with self.r.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hgetall(self.job_key(job_id))
            return [Job.from_hash(h) for h in pipe.execute() if h]

    def shard_requests(self, job_id: str, shard: int) -> list[dict[str, Any]]:
        return orjson.loads(self.r.hget(self.shard_key(job_id, shard), "requests") or "[]")

    def shard_info(self, job_id: str, shard: int) -> dict[str, str]:
        return self.r.hgetall(self.shard_key(job_id, shard))

    def shard_results(self, job_id: str, shard: int) -> dict[int, Result]:
        raw = self.r.hgetall(f"{self.shard_key(job_id, shard)}:results")
        return {int(i): Result.from_json(s) for i, s in raw.items()}

    def iter_shards(self, job_id: str) -> Iterator[tuple[int, list[dict[str, Any]], dict[int, Result]]]:
        """(shard, requests, results) in input order, one shard in memory at a time."""
        for shard in range(self.get_job(job_id).num_shards):
            with self.r.pipeline(transaction=False) as pipe:
                pipe.hget(self.shard_key(job_id, shard), "requests")
                pipe.hgetall(f"{self.shard_key(job_id, shard)}:results")
                requests, results = pipe.execute()
            yield (
                shard,
                orjson.loads(requests or "[]"),
                {int(i): Result.from_json(s) for i, s in results.items()},
            )

    def get_progress(self, job_id: str, shard: int) -> dict[int, Progress]:
        raw = self.r.hgetall(f"{self.shard_key(job_id, shard)}:progress")
        return {int(i): Progress.from_json(s) for i, s in raw.items()}

    def dead_letters(self, job_id: str | None = None) -> list[tuple[str, int, str]]:
        """(job, shard, last error) of the dead-lettered shards of `job_id` (None: of every job
        still kept), oldest first. They are kept with their job and expire with it."""
        jobs = [job_id] if job_id is not None else self.r.zrange(f"{self.prefix}:jobs", 0, -1)
        dead = []
        for job in jobs:
            for shard, ms in self.r.zrange(f"{self.job_key(job)}:dead", 0, -1, withscores=True):
                last_error = self.r.hget(self.shard_key(job, int(shard)), "last_error") or ""
                dead.append((ms, job, int(shard), last_error))
        return [(job, shard, error) for _, job, shard, error in sorted(dead)]

    # ------------------------------------------------------------------ schedule state

    def now(self) -> float:
        """The Redis server's clock (seconds): the one every lease and deadline is judged by."""
        seconds, micros = self.r.time()
        return seconds + micros / 1e6

    def throughput(self, window_s: float = RATE_WINDOW_S) -> tuple[float, float] | None:
        """Results written per second by the whole fleet over the last `window_s`, as (requests/s,
        tokens/s); None when nothing was written in that time (no rate to judge by)."""
        now_ms = self.now() * 1000
        buckets = _rate_buckets(now_ms, window_s)
        with self.r.pipeline(transaction=False) as pipe:
            for bucket in buckets:
                pipe.hmget(f"{self.prefix}:rate:{bucket}", "r", "t")
            return _rates(now_ms, buckets, pipe.execute())

    def requests_ahead(self, deadline_s: float) -> int:
        """Requests still to run in jobs leased before or beside one due at `deadline_s`: every
        running job whose deadline falls in the same class (see LEASE) or an earlier one."""
        jobs = self.r.zrange(f"{self.prefix}:deadlines", "-inf", _class_end_ms(deadline_s), byscore=True)
        with self.r.pipeline(transaction=False) as pipe:
            for job_id in jobs:
                pipe.hmget(self.job_key(job_id), "total", "completed", "failed")
            return _unfinished(pipe.execute())

    def eta(self, deadline_s: float, window_s: float = RATE_WINDOW_S) -> float | None:
        """When the requests ahead of a job due at `deadline_s` (`requests_ahead`, its own
        included) will be done at the fleet's recent throughput, by the server's clock; None
        with no throughput to judge by. Two round trips, for a batch read on every GET."""
        with self.r.pipeline(transaction=False) as pipe:
            pipe.time()
            pipe.zrange(f"{self.prefix}:deadlines", "-inf", _class_end_ms(deadline_s), byscore=True)
            (seconds, micros), jobs = pipe.execute()
        now_ms = seconds * 1000 + micros / 1000
        buckets = _rate_buckets(now_ms, window_s)
        with self.r.pipeline(transaction=False) as pipe:
            for bucket in buckets:
                pipe.hmget(f"{self.prefix}:rate:{bucket}", "r", "t")
            for job_id in jobs:
                pipe.hmget(self.job_key(job_id), "total", "completed", "failed")
            replies = pipe.execute()
        rates = _rates(now_ms, buckets, replies[: len(buckets)])
        if rates is None:
            return None
        return now_ms / 1000 + _unfinished(replies[len(buckets) :]) / rates[0]

    def served_tokens(self) -> dict[str, int]:
        """Tokens each tenant (job owner; '' for none) has been served, the fair share's counters."""
        return {tenant: int(n) for tenant, n in self.r.hgetall(f"{self.prefix}:served").items()}

    def tenant_usage(self) -> dict[str, dict[str, float]]:
        """Per tenant, in one round trip: `harvested` (prompt + completion tokens of its results),
        `device_seconds` (the engine time they took) and `served` (the fair share's counter: it
        also holds estimates for leased work)."""
        with self.r.pipeline(transaction=False) as pipe:
            pipe.hgetall(f"{self.prefix}:harvested")
            pipe.hgetall(f"{self.prefix}:device_seconds")
            pipe.hgetall(f"{self.prefix}:served")
            harvested, seconds, served = pipe.execute()
        return {
            tenant: {
                "harvested": int(harvested.get(tenant, 0)),
                "device_seconds": float(seconds.get(tenant, 0)),
                "served": int(served.get(tenant, 0)),
            }
            for tenant in sorted({*harvested, *seconds, *served})
        }

    def job_usage(self, job_ids: Iterable[str]) -> dict[str, dict[str, float]]:
        """Each job's `harvested_tokens` (prompt + completion tokens of its results so far) and
        `device_seconds` (the engine time they took), in one round trip."""
        job_ids = list(job_ids)
        with self.r.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hmget(self.job_key(job_id), "tokens", "device_seconds")
            rows = pipe.execute()
        return {
            job_id: {"harvested_tokens": int(tokens or 0), "device_seconds": float(seconds or 0)}
            for job_id, (tokens, seconds) in zip(job_ids, rows, strict=True)
        }

    # ------------------------------------------------------------------ worker verbs

    def lease(self, worker: str, visibility_s: float, max_shards: int = 1) -> list[Lease]:
        """Lease up to `max_shards` shards, earliest deadline class first, then the tenant served
        the fewest tokens, then round-robin over its jobs; reclaims expired leases first."""
        got = self._run("LEASE", worker, int(visibility_s * 1000), max_shards, SWEEP_LIMIT)
        leases = []
        for job_id, shard, token, attempts, requests, done, progress, crashes in got:
            pairs = zip(progress[::2], progress[1::2])
            lease = Lease(job_id, int(shard), int(token), int(attempts), orjson.loads(requests))
            lease.done = {int(i) for i in done}
            lease.progress = {int(i): Progress.from_json(p) for i, p in pairs}
            lease.crashes = {int(i): n for i, n in orjson.loads(crashes).items() if int(i) not in lease.done}
            leases.append(lease)
        return leases

    def admit(self, lease: Lease, indices: Iterable[int]) -> str:
        """Record that these requests go into the engine now: 'ok' or 'lost'. Should the lease
        end in a crash, they are the requests charged for it."""
        return self._run("ADMIT", lease.job_id, lease.shard, lease.token, *indices)

    def renew(self, lease: Lease, visibility_s: float, client: Any = None) -> str:
        """'ok'; 'lost' (taken over: stop working on it); 'closed' (job cancelled or expired)."""
        return self._run(
            "RENEW", lease.job_id, lease.shard, lease.token, int(visibility_s * 1000), client=client
        )

    def write_results(self, lease: Lease, results: dict[int, Result], client: Any = None) -> list[str] | str:
        """Fenced, idempotent: 'ok'/'dup' per result, or 'lost'/'closed' when nothing was written.

        With a pipeline as `client` the answer comes from its execute().
        """
        args: list[Any] = []
        for index, result in results.items():
            args += [
                index,
                "c" if result.ok else "f",
                result.prompt_tokens + result.completion_tokens,
                f"{result.device_seconds:.6f}",
                result.to_json(),
            ]
        return self._run("WRITE_RESULTS", lease.job_id, lease.shard, lease.token, *args, client=client)

    def save_progress(self, lease: Lease, progress: dict[int, Progress], client: Any = None) -> str:
        args: list[Any] = []
        for index, p in progress.items():
            args += [index, p.to_json()]
        return self._run("SAVE_PROGRESS", lease.job_id, lease.shard, lease.token, *args, client=client)

    def ack(self, lease: Lease, client: Any = None) -> str:
        """'ok' (shard done), 'incomplete' (a request has no result yet) or 'lost'.

        With a pipeline as `client`, pass its reply through `after_ack`.
        """
        reply = self._run("ACK", lease.job_id, lease.shard, lease.token, client=client)
        return reply if client is not None else self.after_ack(lease, reply)

    def after_ack(self, lease: Lease, reply: str) -> str:
        if reply == "last":  # the job's last shard: completed right away
            self.finalize(lease.job_id)
            return "ok"
        return reply

    def fail(self, lease: Lease, error: str, crashed: bool = False) -> str:
        """The attempt failed: 'requeued', 'dead' (dead-lettered), 'closed' or 'lost'.
        `crashed`: the engine died with the lease's admitted requests in it: charge them."""
        status = self._run("FAIL", lease.job_id, lease.shard, lease.token, error, int(crashed))
        if status == "dead":
            self.finalize(lease.job_id)
        return status

    def release(self, lease: Lease) -> str:
        """Give the shard back unfinished without spending an attempt: 'requeued', 'closed', 'lost'."""
        return self._run("RELEASE", lease.job_id, lease.shard, lease.token)

    # ------------------------------------------------------------------ housekeeping

    def finalize(self, job_id: str) -> JobStatus:
        """finalizing -> completed (the hook where a server-side export would go)."""
        return JobStatus(self._run("FINALIZE", job_id))

    def sweep(self) -> int:
        """Reclaim expired leases, expire overdue jobs, finish jobs left in finalizing.

        Leasing sweeps too; clients call this so that jobs progress with no worker alive.
        """
        reclaimed, finalizing = self._run("SWEEP", SWEEP_LIMIT)
        for job_id in finalizing:
            self.finalize(job_id)
        return int(reclaimed)

    def expire_worker(self, worker: str) -> int:
        """Return every shard leased by `worker` (known dead) to the queue now; how many."""
        return int(self._run("EXPIRE_WORKER", worker))

    def cancel(self, job_id: str) -> JobStatus:
        status = self._run("CANCEL", job_id)
        if not status:
            raise JobNotFoundError(job_id)
        return JobStatus(status)

    def purge(self, job_id: str, force: bool = False) -> int:
        """Delete a finished job and every key of it now (one script); how many keys went.

        A job still running is refused (ValueError) unless `force`, which cancels it in the
        same step: its holders' next writes answer 'lost' and they drop its requests.
        """
        reply = self._run("PURGE", job_id, int(force))
        if not reply:
            raise JobNotFoundError(job_id)
        verdict, value = reply
        if verdict == "refused":
            raise ValueError(f"job {job_id} is {value}; cancel it first, or purge with force")
        return int(value)

    def delete_job(self, job_id: str) -> None:
        """Drop a finished job and everything under it (`purge` without force)."""
        self.purge(job_id)

    def set_job_ttl(self, seconds: float) -> None:
        """How long finished jobs are kept, for every process using this Redis; applies to jobs
        that finish from now on."""
        if not seconds > 0:
            raise ValueError(f"job TTL must be > 0 seconds, got {seconds}")
        self.r.hset(f"{self.prefix}:config", "job_ttl_ms", int(seconds * 1000))

    def job_ttl(self) -> float:
        ms = self.r.hget(f"{self.prefix}:config", "job_ttl_ms")
        return int(ms) / 1000 if ms else DEFAULT_JOB_TTL_S
