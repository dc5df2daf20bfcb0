"""ShardRun: one leased shard's requests inside an engine.

It turns payloads into engine requests (resuming from stored progress), follows their
outputs, and builds one Result per request. It never talks to Redis: the worker decides
when to write what it produces, so the same class serves the local loop and the Ray
worker that interleaves online traffic in the same engine.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

from harvest.protocol.prepare import engine_inputs
from harvest.queue.inputs import RequestSpec
from harvest.queue.models import Lease, Progress, Result

if TYPE_CHECKING:  # the engine pulls in torch: seconds the CLI's read-only commands should not pay
    from harvest.engine import RequestOutput, SamplingParams
    from harvest.engine.request import RequestState


@dataclass
class _Running:
    index: int
    spec: RequestSpec
    params: SamplingParams
    prompt_ids: list[int]  # the original prompt, without resumed tokens
    resumed: list[int]  # output ids carried over from an earlier attempt
    started_at: float
    start_mono: float
    output_ids: list[int] = field(default_factory=list)  # generated in this attempt
    saved: int = 0  # len(resumed + output_ids) at the last progress save
    ttft_s: float | None = None

    @property
    def all_output_ids(self) -> list[int]:
        return self.resumed + self.output_ids


# an engine request ready to add: its id, state, parameters and, to resume from a checkpoint, its engine state
Prepared = tuple[str, _Running, "SamplingParams", "RequestState | None"]


class ShardRun:
    """Feeds one lease's unfinished requests to `engine` and collects their results."""

    def __init__(self, lease: Lease, engine: Any, worker: str) -> None:
        self.lease = lease
        self.engine = engine
        self.worker = worker
        self.running: dict[str, _Running] = {}  # engine request id -> state
        self.results: dict[int, Result] = {}  # produced, not yet written
        self.pending = set(range(len(lease.requests))) - lease.done  # indices without a stored result

    def request_id(self, index: int) -> str:
        # the token makes ids unique across attempts, in case a stale copy is still in the engine
        return f"{self.lease.job_id}/{self.lease.shard}/{index}@{self.lease.token}"

    def prepare(self) -> list[Prepared]:
        """Tokenize the pending requests (slow, touches no shared state): what `commit` adds.
        Bad requests become error results at once: the same model-dependent checks as the
        HTTP routes (`engine_inputs`), with the context the engine can hold."""
        tok, prepared = self.engine.tokenizer, []
        max_model_len = min(self.engine.max_model_len, self.engine.capacity_tokens)
        for index in sorted(self.pending):
            spec = RequestSpec.from_payload(self.lease.requests[index])
            now, mono = time.time(), time.monotonic()
            try:
                inputs = engine_inputs(spec.prompt_spec(), tok, max_model_len)
                params, prompt_ids = inputs.params, inputs.prompt_token_ids
                progress = self.lease.progress.get(index, Progress())
                run = _Running(index, spec, params, prompt_ids, list(progress.token_ids), now, mono)
                run.saved = len(run.resumed)
                left = params.max_tokens - len(run.resumed)
                if left <= 0:  # finished before the crash, result not yet written
                    self.results[index] = self._result(run, "length", mono)
                    continue
                rid = self.request_id(index)
                resume_params = replace(params, max_tokens=left)
                state = self._checkpoint_state(rid, prompt_ids + run.resumed, resume_params, progress)
                prepared.append((rid, run, resume_params, state))
            except Exception as exc:  # a bad request fails alone, never its shard
                self.results[index] = Result.error(
                    "invalid_request", str(exc), started_at=now, finished_at=time.time(),
                    worker=self.worker, attempt=self.lease.attempt)  # fmt: skip
        return prepared

    def commit(self, prepared: list[Prepared]) -> None:
        """Hand prepared requests to the engine (its inbox: safe from any thread); a request
        the engine refuses becomes an error result."""
        for rid, run, params, state in prepared:
            self.running[rid] = run  # before the engine can produce its first output
            try:
                if state is not None:
                    self.engine.resume(state)
                else:
                    ids = run.prompt_ids + run.resumed
                    self.engine.add_request(ids, params, request_id=rid, request_class="offline")
            except Exception as exc:
                del self.running[rid]
                self.results[run.index] = Result.error(
                    "invalid_request", str(exc), started_at=run.started_at, finished_at=time.time(),
                    worker=self.worker, attempt=self.lease.attempt)  # fmt: skip

    def _checkpoint_state(self, rid: str, token_ids: list[int], params: SamplingParams,
                          progress: Progress) -> RequestState | None:  # fmt: skip
        """The engine state that continues from the KV checkpoint an earlier attempt left (the
        engine adopts it off its step; one that is gone costs a recompute)."""
        if progress.checkpoint is None or not hasattr(self.engine, "resume"):
            return None
        from harvest.engine.request import RequestState

        return RequestState(request_id=rid, token_ids=token_ids, num_prompt_tokens=len(token_ids),
                            params=asdict(params), request_class="offline", arrival_time=time.monotonic(),
                            checkpoint=progress.checkpoint)  # fmt: skip

    def on_output(self, out: RequestOutput) -> None:
        """A finished request's last output becomes its result. Unfinished outputs need nothing
        (progress reads the engine's tokens), which keeps the engine loop's share tiny."""
        run = self.running.pop(out.request_id, None) if out.finished else None
        if run is None:
            return
        mono = time.monotonic()
        run.output_ids = out.token_ids
        if "first_token_time" in out.metrics:
            run.ttft_s = out.metrics["first_token_time"] - run.start_mono
        reason = out.finish_reason.value if out.finish_reason is not None else None
        if reason == "error":  # the engine failed on this request alone: its line's error record
            self.results[run.index] = Result.error(
                "engine_error", out.error or "the engine failed on this request", started_at=run.started_at,
                finished_at=time.time(), ttft_s=run.ttft_s, latency_s=mono - run.start_mono,
                worker=self.worker, attempt=self.lease.attempt)  # fmt: skip
            return
        self.results[run.index] = self._result(run, reason, mono, out.text)

    def _result(self, run: _Running, reason: str | None, mono: float, text: str | None = None) -> Result:
        ids = run.all_output_ids
        if text is None or run.resumed:
            text = self._decode(run.prompt_ids, ids, run.params, reason)
        return Result(
            status="completed", text=text, token_ids=ids, finish_reason=reason,
            prompt_tokens=len(run.prompt_ids), completion_tokens=len(ids), resumed_tokens=len(run.resumed),
            started_at=run.started_at, finished_at=time.time(), ttft_s=run.ttft_s,
            latency_s=mono - run.start_mono, worker=self.worker, attempt=self.lease.attempt,
        )  # fmt: skip

    def _decode(self, prompt: list[int], ids: list[int], params: SamplingParams, reason: str | None) -> str:
        """Text of a resumed request: its stop strings may straddle the resume point."""
        from harvest.engine.detokenizer import decode_output

        text = decode_output(self.engine.tokenizer, prompt, ids)
        cuts = [text.find(s) for s in params.stop if s in text]
        return text[: min(cuts)] if cuts and reason == "stop" else text

    def progress_updates(self) -> dict[int, Progress]:
        """Requests that generated tokens since the last call (their full progress so far)."""
        updates = {}
        requests = getattr(self.engine, "requests", {})
        for rid, run in self.running.items():
            req = requests.get(rid)
            if req is None:  # not admitted yet, or finished and its output not routed yet
                continue
            ids = run.resumed + list(req.output_token_ids)
            if len(ids) > run.saved:
                updates[run.index] = Progress(ids, req.checkpoint)
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
            self.engine.abort(rid)
        self.running.clear()

    @property
    def done(self) -> bool:
        return not self.pending and not self.running and not self.results
