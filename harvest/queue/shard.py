"""ShardRun: one leased shard's requests inside an engine.

It turns payloads into engine requests (resuming from stored progress), submits them
through the engine client with itself as their output sink, follows their outputs, and
builds one Result per request. It never talks to Redis: the worker decides when to write
what it produces, so the same class serves the local worker and the Ray worker that
interleaves online traffic in the same engine.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any

from harvest.checkpoint.handle import CheckpointHandle
from harvest.protocol.engine_client import EngineClient, EngineLoopError, OutputSink
from harvest.protocol.prepare import engine_inputs
from harvest.protocol.sampling_params import SamplingParams
from harvest.protocol.types import FinishReason, RequestClass, RequestOutput
from harvest.queue.inputs import RequestSpec
from harvest.queue.models import Lease, Progress, Result

log = logging.getLogger(__name__)


@dataclass
class _Running:
    index: int
    spec: RequestSpec
    params: SamplingParams
    prompt_ids: list[int]  # the original prompt, without resumed tokens
    resumed: list[int]  # output ids carried over from an earlier attempt
    started_at: float
    start_mono: float
    resume_from: CheckpointHandle | None = None  # the KV checkpoint an earlier attempt left, if any
    output_ids: list[int] = field(default_factory=list)  # generated in this attempt, as last reported
    checkpoint: CheckpointHandle | None = None  # this attempt's KV checkpoint, as last reported
    saved: int = 0  # len(resumed + output_ids) at the last progress save
    ttft_s: float | None = None

    @property
    def all_output_ids(self) -> list[int]:
        return self.resumed + self.output_ids


def prefix_primers(prompts: list[list[int]], block_size: int) -> list[int]:
    """Positions of the requests to admit before the rest: the first of each group of two or
    more prompts that share their first full block. The engine's prefix cache holds a block
    only once it is computed, so requests that enter side by side all compute the shared
    prefix; once a primer has run, the rest of its group find it cached."""
    first: dict[tuple[int, ...], int] = {}
    members: dict[tuple[int, ...], int] = {}
    for position, ids in enumerate(prompts):
        if len(ids) > block_size:  # the last token is always computed: a block short of it is useless
            key = tuple(ids[:block_size])
            first.setdefault(key, position)
            members[key] = members.get(key, 0) + 1
    return sorted(first[key] for key, n in members.items() if n > 1)


# an engine request ready to add: its id, state and parameters (max_tokens: what is left)
Prepared = tuple[str, _Running, SamplingParams]


class ShardRun:
    """Feeds one lease's unfinished requests to the engine and collects their results.

    `lock` is the worker's: it guards `running`, `results` and `pending`, which the engine's
    thread updates through `on_output` and the worker's I/O thread reads and writes."""

    def __init__(self, lease: Lease, client: EngineClient, worker: str, lock: threading.Lock) -> None:
        self.lease = lease
        self.client = client
        self.worker = worker
        self.lock = lock
        self.running: dict[str, _Running] = {}  # engine request id -> state
        self.results: dict[int, Result] = {}  # produced, not yet written
        self.pending = set(range(len(lease.requests))) - lease.done  # indices without a stored result
        self.followers: dict[int, list[int]] = {}  # index -> identical requests that take its result

    def request_id(self, index: int) -> str:
        # the token makes ids unique across attempts, in case a stale copy is still in the engine
        return f"{self.lease.job_id}/{self.lease.shard}/{index}@{self.lease.token}"

    def prepare(self) -> list[Prepared]:
        """Tokenize the pending requests (slow, touches no shared state): what `expect` and
        `start` add. Bad requests become error results at once: the same model-dependent
        checks as the HTTP routes (`engine_inputs`), with the context the engine can hold.

        The rest come back sorted by prompt ids, so that requests sharing a prefix enter the
        engine side by side and hit its prefix cache while the shared blocks are still held
        (the worker admits `prefix_primers` of them first, the rest of the shard together
        after). Identical deterministic requests (see `dedup_key`) are computed once: the
        first is prepared, the others follow it and get a copy of its result."""
        runs = [run for index in sorted(self.pending) if (run := self._prepare_one(index)) is not None]
        leaders: dict[tuple[object, ...], int] = {}
        heads: list[_Running] = []  # the requests that run: all but the followers
        for run in sorted(runs, key=lambda run: run.prompt_ids):  # stable: the lowest index leads
            key = self.dedup_key(run)
            if key is not None:
                leader = leaders.setdefault(key, run.index)
                if leader != run.index and not run.resumed and run.resume_from is None:
                    self.followers.setdefault(leader, []).append(run.index)
                    continue
            heads.append(run)
        prepared: list[Prepared] = []
        for run in heads:  # after grouping: a leader's result reaches every follower
            left = run.params.max_tokens - len(run.resumed)
            if left <= 0:  # finished before the crash, result not yet written
                self._set_result(run.index, self._result(run, "length", run.start_mono))
                continue
            prepared.append((self.request_id(run.index), run, replace(run.params, max_tokens=left)))
        return prepared

    def _prepare_one(self, index: int) -> _Running | None:
        spec = RequestSpec.from_payload(self.lease.requests[index])
        now, mono = time.time(), time.monotonic()
        try:
            limit = self.client.limits.max_request_tokens
            inputs = engine_inputs(spec.prompt_spec(), self.client.tokenizer, limit)
        except Exception as exc:  # a bad request fails alone, never its shard
            self.results[index] = Result.error("invalid_request", str(exc), **self._stamp(now))
            return None
        progress = self.lease.progress.get(index, Progress())
        resumed = list(progress.token_ids)
        run = _Running(index, spec, inputs.params, inputs.prompt_token_ids, resumed, now, mono)
        run.saved = len(run.resumed)
        run.resume_from = progress.checkpoint
        return run

    def dedup_key(self, run: _Running) -> tuple[object, ...] | None:
        """What makes two requests of this job give the same output, or None when they may
        differ: sampling that is neither greedy nor seeded, or a job submitted with dedup off."""
        if not self.lease.requests[run.index].get("dedup", True):
            return None
        if not run.params.greedy and run.params.seed is None:
            return None
        return (tuple(run.prompt_ids), repr(run.params))

    def _set_result(self, index: int, result: Result) -> None:
        """A request's result, copied to the requests that follow it (lock held, or before the
        shard is shared): each keeps its own record, marked as computed once."""
        self.results[index] = result
        for follower in self.followers.pop(index, []):  # the device time was spent once
            self.results[follower] = replace(result, deduplicated=True, device_seconds=0.0)

    def expect(self, prepared: list[Prepared]) -> None:
        """Count prepared requests as running (lock held), before `start` submits them: no
        output can come before its request is known."""
        for rid, run, _ in prepared:
            self.running[rid] = run

    def start(self, prepared: list[Prepared], sink: OutputSink) -> None:
        """Submit expected requests to the engine with `sink` (which calls `on_output`), with
        no lock held: resuming from a checkpoint may wait on the store. A request the engine
        refuses becomes an error result."""
        for rid, run, params in prepared:
            ids = run.prompt_ids + run.resumed
            try:
                if run.resume_from is not None:
                    self.client.resume_from_checkpoint(rid, ids, params, run.resume_from, sink)
                else:
                    self.client.submit(ids, params, rid, RequestClass.OFFLINE, sink)
            except EngineLoopError:  # no engine to run it: the worker's stop gives it back with the lease
                log.warning("the engine is not running; %s stays with its lease", rid)
            except Exception as exc:
                error = Result.error("invalid_request", str(exc), **self._stamp(run.started_at))
                with self.lock:
                    if self.running.pop(rid, None) is not None:
                        self._set_result(run.index, error)

    def on_output(self, out: RequestOutput) -> bool:
        """One output of this shard's requests, on the engine's thread: remember how far the
        request got (an assignment) or turn a finished one into its result. True when that
        was the shard's last running request."""
        with self.lock:
            run = self.running.get(out.request_id)
            if run is None:  # dropped meanwhile (lease lost, job closed)
                return False
            if not out.finished:
                run.output_ids, run.checkpoint = out.token_ids, out.checkpoint
                return False
            del self.running[out.request_id]
            self._finish(run, out)
            return not self.running

    def _finish(self, run: _Running, out: RequestOutput) -> None:
        mono = time.monotonic()
        run.output_ids = out.token_ids
        if "first_token_time" in out.metrics:
            run.ttft_s = out.metrics["first_token_time"] - run.start_mono
        reason = out.finish_reason.value if out.finish_reason is not None else None
        if out.finish_reason is FinishReason.ERROR:  # the engine failed on this request alone
            message = out.error or "the engine failed on this request"
            fields = self._result_fields(run, mono, out.device_seconds)
            result = Result.error("engine_error", message, **fields)
        else:
            result = self._result(run, reason, mono, out.text, out.device_seconds)
        self._set_result(run.index, result)

    def _result(self, run: _Running, reason: str | None, mono: float, text: str | None = None,
                device_seconds: float = 0.0) -> Result:  # fmt: skip
        ids = run.all_output_ids
        if text is None or run.resumed:
            text = self._decode(run.prompt_ids, ids, run.params, reason)
        return Result(
            status="completed",
            text=text,
            token_ids=ids,
            finish_reason=reason,
            prompt_tokens=len(run.prompt_ids),
            completion_tokens=len(ids),
            resumed_tokens=len(run.resumed),
            **self._result_fields(run, mono, device_seconds),
        )

    def _stamp(self, started_at: float) -> dict[str, Any]:
        """The timing and worker fields of every result this attempt writes, ending now."""
        return {
            "started_at": started_at,
            "finished_at": time.time(),
            "worker": self.worker,
            "attempt": self.lease.attempt,
        }

    def _result_fields(self, run: _Running, mono: float, device_seconds: float = 0.0) -> dict[str, Any]:
        """`_stamp` of a request that ran in the engine, with its latencies (`mono`: its end)
        and the engine time it took."""
        return {
            **self._stamp(run.started_at),
            "ttft_s": run.ttft_s,
            "latency_s": mono - run.start_mono,
            "device_seconds": device_seconds,
        }

    def _decode(self, prompt: list[int], ids: list[int], params: SamplingParams, reason: str | None) -> str:
        """Text of a resumed request: its stop strings may straddle the resume point."""
        from harvest.engine.detokenizer import decode_output

        text = decode_output(self.client.tokenizer, prompt, ids)
        cuts = [text.find(s) for s in params.stop if s in text]
        return text[: min(cuts)] if cuts and reason == "stop" else text

    def progress_updates(self) -> dict[int, Progress]:
        """Requests that generated tokens since the last call (their full progress so far, as
        their outputs reported it). Called with the lock held."""
        updates = {}
        for run in self.running.values():
            ids = run.resumed + run.output_ids
            if len(ids) > run.saved:
                updates[run.index] = Progress(ids, run.checkpoint)
                run.saved = len(ids)
        return updates

    def take_results(self) -> dict[int, Result]:
        results, self.results = self.results, {}
        return results

    def mark_written(self, indices: list[int]) -> None:
        self.pending.difference_update(indices)

    def abort(self) -> None:
        """Drop this shard's requests from the engine (lease lost or job closed)."""
        for rid in list(self.running):
            self.client.abort(rid)
        self.running.clear()

    @property
    def done(self) -> bool:
        return not self.pending and not self.running and not self.results
