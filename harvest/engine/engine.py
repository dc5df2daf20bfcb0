"""The engine: `step()` is schedule -> execute -> update."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import threading
from collections import deque
from collections.abc import Sequence
from typing import Any

from transformers import AutoTokenizer

from harvest.checkpoint.checkpointer import Checkpointer
from harvest.checkpoint.handle import CheckpointHandle
from harvest.checkpoint.loader import CheckpointLoader
from harvest.checkpoint.store import CheckpointStore, HostCheckpointStore
from harvest.engine.attention import LayerAbort
from harvest.engine.block_manager import BlockManager
from harvest.engine.clock import WALL, Clock, WallClock
from harvest.engine.config import CacheConfig, EngineConfig, Policy, SchedulerConfig, SLOConfig
from harvest.engine.detokenizer import Detokenizer, decode_output
from harvest.engine.fault import describe, is_engine_fault, isolate_forward, sample_rows
from harvest.engine.latency_model import LatencyModel, profile
from harvest.engine.metrics import EngineStats, StepMetrics
from harvest.engine.model_runner import DTYPES, ModelRunner, free_device_memory, load_shape, resolve_dtype
from harvest.engine.request import (
    FinishReason,
    Request,
    RequestClass,
    RequestOutput,
    RequestState,
    RequestStatus,
)
from harvest.engine.sampling import SamplingParams, sample
from harvest.engine.scheduler import ScheduledBatch, Scheduler
from harvest.engine.sim_runner import SimulatedRunner
from harvest.models.resolve import resolve_model

CACHE_KEYS = ("block_size", "num_blocks", "kv_cache_bytes", "kv_cache_fraction", "enable_prefix_caching")
SCHEDULER_KEYS = ("max_num_batched_tokens", "max_num_seqs", "policy", "slo", "cut_online_prefills")

log = logging.getLogger(__name__)


class Engine:
    """One model replica with a paged KV pool, continuous batching and two request classes.

    `step()` runs on one thread, which owns every request's state: `add_request`, `abort`
    and `resume` may be called from any thread, but they only put the request into an inbox
    that the next step drains (a request joins `requests` there), and an online arrival
    abandons an offline-only step in flight at the next layer boundary (harvest policy).
    `export` runs on the stepping thread, between steps.
    """

    def __init__(
        self, config: EngineConfig, checkpoint_store: CheckpointStore | None = None, clock: Clock = WALL
    ) -> None:
        """`clock`: where every time the engine reads comes from (harvest/engine/clock.py); a
        virtual one only with the simulated device, whose sleeps advance it."""
        if not isinstance(clock, WallClock) and not config.simulated:
            raise ValueError("only the simulated device runs on a virtual clock")
        self.clock = clock
        model_path = str(resolve_model(config.model))  # a Hub id: from the cache, or downloaded
        config = dataclasses.replace(config, dtype=resolve_dtype(config.dtype, config.device, model_path))
        self.config = config
        shape = load_shape(model_path)
        max_len = config.max_model_len or shape.max_position_embeddings
        if shape.sliding_window:
            max_len = min(max_len, shape.sliding_window)  # we attend over full context only
        self.max_model_len = max_len
        cache = config.cache
        block_bytes = shape.block_bytes(cache.block_size, DTYPES[config.dtype])
        num_blocks = cache.num_blocks or self._blocks_for(cache, block_bytes, model_path)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        if config.simulated:
            self.runner = SimulatedRunner(
                model_path, config.device, config.dtype, num_blocks, cache.block_size, clock
            )
        else:
            self.runner = ModelRunner(model_path, config.device, config.dtype, num_blocks, cache.block_size)
        # the KV of a token depends on the model and its dtype besides the tokens before it
        salt = f"{model_path}|{config.dtype}"
        self.block_manager = BlockManager(num_blocks, cache.block_size, cache.enable_prefix_caching, salt)
        self.latency = LatencyModel()
        self.policy = config.scheduler.policy
        self.checkpoint_store = HostCheckpointStore() if checkpoint_store is None else checkpoint_store
        self.checkpointer = Checkpointer(self.runner.kv_cache, cache.block_size, self.checkpoint_store)
        # in virtual time a load on a thread would land a step earlier or later from run to run
        inline = not isinstance(clock, WallClock)
        self.loader = CheckpointLoader(self.runner.kv_cache, cache.block_size, self.checkpoint_store, inline)
        self.scheduler = Scheduler(
            config.scheduler, self.block_manager, self.latency, self.loader.cancel, clock.now
        )
        self._restored = 0  # tokens loaded since the last recorded step
        self.requests: dict[str, Request] = {}  # the stepping thread's, as `_detokenizers`
        self._detokenizers: dict[str, Detokenizer] = {}
        self._inbox: deque[tuple[str, Any]] = deque()  # ("add", (request, detokenizer)) or ("abort", id)
        # ids in the inbox or in `requests`: the caller of a duplicate hears it at once, and
        # the loop never meets two requests under one id
        self._taken_ids: set[str] = set()
        self._inbox_lock = threading.Lock()  # guards `_taken_ids`, and the inbox for `export`
        self._online_arrived = threading.Event()
        self._ids = itertools.count()
        self.eos_token_ids = self._eos_ids()
        self.stats = EngineStats()
        self.last_step = StepMetrics(kv_blocks_total=num_blocks)
        if self.policy is Policy.HARVEST and config.profile_latency:
            self.profile_latency()

    @classmethod
    def from_pretrained(
        cls, model: str, checkpoint_store: CheckpointStore | None = None, clock: Clock = WALL, **kwargs
    ) -> Engine:
        """`Engine.from_pretrained(path or "ORG/NAME[@REVISION]", device=..., dtype=..., num_blocks=...,
        max_num_seqs=..., policy=..., enable_prefix_caching=...)`."""
        cache = CacheConfig(**{k: kwargs.pop(k) for k in CACHE_KEYS if k in kwargs})
        if isinstance(kwargs.get("slo"), dict):
            kwargs["slo"] = SLOConfig(**kwargs["slo"])
        sched = SchedulerConfig(**{k: kwargs.pop(k) for k in SCHEDULER_KEYS if k in kwargs})
        return cls(EngineConfig(model=model, cache=cache, scheduler=sched, **kwargs), checkpoint_store, clock)

    def _blocks_for(self, cache: CacheConfig, block_bytes: int, model_path: str) -> int:
        enough = self.config.scheduler.max_num_seqs * -(-self.max_model_len // cache.block_size)
        kv_bytes = cache.kv_cache_bytes
        if cache.kv_cache_fraction is not None:
            kv_bytes = int(cache.kv_cache_fraction * free_device_memory(self.config.device, model_path))
        return max(1, min(kv_bytes // block_bytes, enough))

    def _eos_ids(self) -> set[int]:
        eos = self.runner.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        return set(eos) if isinstance(eos, list) else ({eos} if eos is not None else set())

    @property
    def capacity_tokens(self) -> int:
        return self.block_manager.num_blocks * self.block_manager.block_size

    def profile_latency(self) -> None:
        """Fit the step-latency model to timed forwards over a grid of batch shapes."""
        sched = self.config.scheduler
        samples = profile(self.runner.execute_synchronized, self.block_manager, sched.max_num_batched_tokens,
                          sched.max_num_seqs, self.max_model_len, now=self.clock.now)  # fmt: skip
        self.latency.profile_samples = [(s.features(), t) for s, t in samples]
        self.latency.fit()

    # ------------------------------------------------------------------ requests

    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        request_class: RequestClass | str = RequestClass.OFFLINE,
        stream_text: bool = False,
        arrival_time: float | None = None,
        priority: int = 0,
    ) -> str:
        """Queue a request; returns its id. `stream_text` adds text deltas to step outputs;
        `priority` orders it within its class, lower first (`FLEX_PRIORITY`)."""
        params = params or SamplingParams()
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        limit = min(self.max_model_len, self.capacity_tokens)
        if len(ids) >= limit:
            raise ValueError(f"prompt has {len(ids)} tokens; this engine takes at most {limit - 1}")
        request_id = request_id or f"req-{next(self._ids)}"
        arrival_time = self.clock.now() if arrival_time is None else arrival_time
        req = Request(request_id, ids, params, RequestClass(request_class), arrival_time, priority)
        self._enqueue(req, stream_text)
        return request_id

    def resume(self, state: RequestState, stream_text: bool = False) -> str:
        """Continue a request exported by `export` or recorded by the queue, from its
        `checkpoint` when it has one (this engine's store adopts it, off the step: see
        harvest/checkpoint/loader.py; one that is gone costs a recompute)."""
        req = Request.from_state(state)
        if req.checkpoint is not None and self.scheduler.config.checkpoints:
            # the handle's count is a promise the load checks; leave at least one token to compute
            bs = self.block_manager.block_size
            req.checkpointed_tokens = min(req.checkpoint.tokens, (req.num_tokens - 1) // bs * bs)
        else:
            req.checkpoint = None
        self._enqueue(req, stream_text)
        return req.request_id

    def _enqueue(self, req: Request, stream_text: bool) -> None:
        if self.policy is Policy.ONLINE_ONLY and not req.is_online:
            raise ValueError("this engine runs the online-only policy: offline requests are not accepted")
        detok = None
        if stream_text or req.params.stop:
            # built here, where a failing replay of a resumed request's tokens reaches its caller
            detok = Detokenizer(self.tokenizer, req.params.stop, req.prompt_token_ids)
            for token in req.output_token_ids:
                detok.push(token)
        with self._inbox_lock:
            if req.request_id in self._taken_ids:
                raise ValueError(f"duplicate request id {req.request_id!r}")
            self._taken_ids.add(req.request_id)
            self._inbox.append(("add", (req, detok)))
        if req.is_online:
            self._online_arrived.set()

    def abort(self, request_id: str) -> None:
        """Abort a request; its final output (finish reason `abort`) comes from the next step."""
        with self._inbox_lock:
            self._inbox.append(("abort", request_id))

    def export(self, request_id: str) -> RequestState:
        """Take a request out of this engine (between steps), checkpointing its full blocks;
        one still in the inbox leaves as it came."""
        req = self.requests.get(request_id) or self._take_from_inbox(request_id)
        if self.scheduler.config.checkpoints and req.status is RequestStatus.RUNNING:
            self.checkpointer.save(req)
            for landed in self.checkpointer.poll(wait=True):  # others' copies land here too
                self._refresh_handle(landed)
        if not self.scheduler.config.checkpoints:
            req.checkpointed_tokens, req.checkpoint = 0, None
        elif req.status is RequestStatus.RUNNING:  # a waiting or loading one's handle is as it was
            self._refresh_handle(req)
        self.scheduler.finish(req)  # a loading one's load is cancelled first
        store = self.checkpoint_store
        if req.status is RequestStatus.LOADING and (held := store.num_blocks(request_id)):
            # adopted already: the handle it came with may name a source that is gone now
            tokens = min(req.checkpointed_tokens, held * self.block_manager.block_size)
            req.checkpoint = CheckpointHandle(store.name, request_id, tokens)
        self._forget(request_id)
        state = req.export_state()
        req.status = RequestStatus.FINISHED
        return state

    def _take_from_inbox(self, request_id: str) -> Request:
        with self._inbox_lock:
            for i, (kind, item) in enumerate(self._inbox):
                if kind == "add" and item[0].request_id == request_id:
                    del self._inbox[i]
                    return item[0]
        raise KeyError(request_id)

    def _forget(self, request_id: str) -> Detokenizer | None:
        """The request has left the engine: its id is free again. Returns its detokenizer."""
        self.requests.pop(request_id, None)
        with self._inbox_lock:
            self._taken_ids.discard(request_id)
        return self._detokenizers.pop(request_id, None)

    def has_unfinished(self) -> bool:
        return bool(self._inbox) or self.scheduler.has_unfinished()

    def _drain_inbox(self) -> list[RequestOutput]:
        self._online_arrived.clear()
        outputs = []
        while self._inbox:
            kind, item = self._inbox.popleft()
            if kind == "add":
                req, detok = item
                self.requests[req.request_id] = req
                if detok is not None:
                    self._detokenizers[req.request_id] = detok
                self.scheduler.add(req)
            elif (req := self.requests.get(item)) is not None and not req.is_finished:
                self._finish(req, FinishReason.ABORT)
                outputs.append(self._final_output(req))
        return outputs

    # ------------------------------------------------------------------ the loop

    def step(self) -> list[RequestOutput]:
        start = self.clock.now()  # the latency model learns whole steps, scheduling included
        outputs = self._drain_inbox()
        self._finish_loads()
        batch = self.scheduler.schedule()
        self._start_loads(batch)
        if not batch:
            if self.loader.pending:  # nothing to run until a load is in: wait for one, not spin
                self.loader.wait(0.005)
            return outputs
        abort = None
        if self.policy is Policy.HARVEST and batch.offline_only:
            abort = self._online_arrived.is_set
        try:
            logits = self.runner.execute(batch.requests, batch.num_new_tokens, abort)
        except LayerAbort:
            # nothing was committed: progress counters advance only in _update, and the
            # keys/values written so far sit in slots past num_computed_tokens
            self._record(batch, start, aborted=True)
            return outputs
        except Exception as exc:
            if is_engine_fault(exc):
                raise
            # as after a layer abort nothing was committed: the requests that made the forward
            # fail end with an error, everybody else runs this step again next time
            outputs += self._isolate(batch, exc)
            self._record(batch, start, aborted=True)
            return outputs
        outputs += self._update(batch, logits, start)
        checkpointed = self._checkpoint(batch)
        self._record(batch, start, checkpointed=checkpointed)
        return outputs

    def _start_loads(self, batch: ScheduledBatch) -> None:
        bs, ours = self.block_manager.block_size, self.checkpoint_store.name
        for req, first_block in batch.loads:
            handle = req.checkpoint
            if handle is not None and (handle.store, handle.key) == (ours, req.request_id):
                handle = None  # in this engine's store already: nothing to adopt
            self.loader.submit(req, first_block, req.checkpointed_tokens // bs, handle)

    def _finish_loads(self) -> None:
        """Requests whose checkpoint is in their blocks join the running ones. One that found
        less than it was promised (a store or node gone) recomputes the rest, still exact."""
        bs = self.block_manager.block_size
        for load in self.loader.poll():
            req = load.request
            if req.status is not RequestStatus.LOADING:
                continue
            if (loaded := load.loaded_blocks * bs) < req.checkpointed_tokens:
                log.info(
                    "checkpoint of %s: %d of %d tokens came back",
                    req.request_id,
                    loaded,
                    req.checkpointed_tokens,
                )
            req.checkpointed_tokens = min(req.checkpointed_tokens, load.stored * bs)
            req.num_computed_tokens = load.loaded_blocks * bs
            req.status = RequestStatus.RUNNING
            self._refresh_handle(req)
            self._restored += (load.loaded_blocks - load.first_block) * bs

    def _checkpoint(self, batch: ScheduledBatch) -> int:
        if not self.scheduler.config.checkpoints:
            return 0
        # only a request that computed tokens this step can have filled a block: the paused
        # ones beside it (dozens, next to online work) cost nothing here
        stepped = [r for r in batch.requests if not r.is_online and r.status is RequestStatus.RUNNING]
        saved = sum(self.checkpointer.save(r) for r in stepped)
        for req in dict.fromkeys([*stepped, *self.checkpointer.poll()]):
            self._refresh_handle(req)
        return saved

    def _refresh_handle(self, req: Request) -> None:
        """Point the request's handle at what this engine's store holds for it."""
        tokens, handle = req.checkpointed_tokens, req.checkpoint
        if handle is None and not tokens:
            return
        current = CheckpointHandle(self.checkpoint_store.name, req.request_id, tokens) if tokens else None
        if handle != current:
            req.checkpoint = current

    def _isolate(self, batch: ScheduledBatch, error: Exception) -> list[RequestOutput]:
        """Finish the requests whose forward fails alone with an error (see fault.py)."""
        culprits = isolate_forward(self.runner.execute, batch.requests, batch.num_new_tokens, error)
        return [self._fail(self.requests[rid], exc) for rid, exc in culprits.items()]

    def _update(self, batch: ScheduledBatch, logits, start: float) -> list[RequestOutput]:
        pairs = zip(batch.requests, batch.num_new_tokens)
        sampling = [r for r, n in pairs if r.num_computed_tokens + n == r.num_tokens]
        # what can fail runs before anything is committed, and per request: a request whose
        # sampling or detokenizer raises ends with an error, alone
        token_ids, errors = sample_rows(sample, logits, sampling)
        # The step so far (scheduling, forward, sampling: the sampled ids on the host mean the
        # device is done) is shared by the tokens each request computed. A forward's cost is
        # mostly per token (weights applied to every token; a decode step's weight reads are
        # split evenly over its tokens), attention's part per context is the smaller one, and a
        # token share adds up to the step, so the requests' device seconds sum to the time the
        # engine ran them. Aborted steps charge nobody: their work is redone and charged then.
        share = (self.clock.now() - start) / batch.num_tokens
        for req, n in zip(batch.requests, batch.num_new_tokens):
            req.num_computed_tokens += n
            req.device_seconds += n * share
            self.block_manager.cache_full_blocks(req)
        now = self.clock.now()
        outputs = []
        for req, token in zip(sampling, token_ids):
            detok = self._detokenizers.get(req.request_id)
            error = errors.get(req.request_id)
            if error is None:
                try:
                    delta = detok.push(token) if detok is not None else ""
                except Exception as exc:  # a detokenizer holds one request's text: its fault alone
                    error = exc
            if error is not None:
                outputs.append(self._fail(req, error))
                continue
            req.token_ids.append(token)
            if req.first_token_time is None:
                req.first_token_time = now
            reason = self._finish_reason(req, token, detok)
            if reason is not None:
                self._finish(req, reason)
                outputs.append(self._final_output(req, [token], delta))
            else:
                text = detok.text[: detok.emitted] if detok is not None else ""
                outputs.append(
                    RequestOutput(
                        req.request_id,
                        [token],
                        req.output_token_ids,
                        text,
                        delta,
                        request_class=req.request_class,
                        checkpoint=req.checkpoint,
                    )
                )
        sampled = [r for r in sampling if r.finish_reason is not FinishReason.ERROR]
        if req_count := len(sampled):
            online = sum(r.is_online for r in sampled)
            self.stats.generated_online += online
            self.stats.generated_offline += req_count - online
        return outputs

    def _record(
        self, batch: ScheduledBatch, start: float, aborted: bool = False, checkpointed: int = 0
    ) -> None:
        restored, self._restored = self._restored, 0
        elapsed = self.clock.now() - start
        if not aborted and batch.shape.seqs:
            self.latency.observe(batch.shape, elapsed)
            self.scheduler.observe(batch, elapsed)
        sched = self.scheduler
        predicted = self.latency.predict(batch.shape)
        blocks = self.block_manager.num_blocks
        m = StepMetrics.of(
            batch,
            sched.running,
            sched.waiting_counts(),
            blocks,
            predicted,
            elapsed,
            restored,
            checkpointed,
            aborted,
            self.clock.now(),
        )
        self.last_step = m
        self.stats.add(m)

    def _finish_reason(self, req: Request, token: int, detok: Detokenizer | None) -> FinishReason | None:
        p = req.params
        if (token in self.eos_token_ids and not p.ignore_eos) or token in p.stop_token_ids:
            return FinishReason.STOP
        if detok is not None and detok.stopped:
            return FinishReason.STOP
        if req.num_output_tokens >= p.max_tokens:
            return FinishReason.LENGTH
        if req.num_tokens >= min(self.max_model_len, self.capacity_tokens):
            return FinishReason.LENGTH
        return None

    def _finish(self, req: Request, reason: FinishReason) -> None:
        self.loader.cancel(req, drop=True)
        self.scheduler.finish(req)
        self.checkpointer.drop(req)
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason

    def _fail(self, req: Request, error: Exception) -> RequestOutput:
        log.warning("request %s failed in the engine: %s", req.request_id, describe(error), exc_info=error)
        self._finish(req, FinishReason.ERROR)
        return self._final_output(req, error=describe(error))

    def _final_output(
        self, req: Request, new_token_ids: list[int] | None = None, delta: str = "", error: str | None = None
    ) -> RequestOutput:
        detok = self._forget(req.request_id)
        output_ids = req.output_token_ids
        if error is not None:
            text = ""  # decoding may be what failed: the error is the answer
        elif detok is not None:
            delta += detok.flush()
            text = detok.text
        else:
            keep = output_ids
            if req.finish_reason is FinishReason.STOP and keep and keep[-1] in self.eos_token_ids:
                keep = keep[:-1]
            text = decode_output(self.tokenizer, req.prompt_token_ids, keep)
        metrics = {"arrival_time": req.arrival_time, "finish_time": self.clock.now()}
        if req.first_scheduled_time is not None:
            metrics["first_scheduled_time"] = req.first_scheduled_time
        if req.first_token_time is not None:
            metrics["first_token_time"] = req.first_token_time
        output = RequestOutput(
            req.request_id,
            new_token_ids or [],
            output_ids,
            text,
            delta,
            finished=True,
            finish_reason=req.finish_reason,
            num_prompt_tokens=req.num_prompt_tokens,
            num_output_tokens=req.num_output_tokens,
            num_preemptions=req.num_preemptions,
            device_seconds=req.device_seconds,
            metrics=metrics,
            error=error,
            request_class=req.request_class,
        )
        self.stats.observe_finished(req.request_class.value, output)
        return output

    # ------------------------------------------------------------------ convenience

    def generate(
        self,
        prompts: Sequence[str | list[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Run `prompts` to completion; outputs in input order, each with `.text` and `.token_ids`."""
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, params)]
        done: dict[str, RequestOutput] = {}
        while len(done) < len(ids):
            for out in self.step():
                if out.finished:
                    done[out.request_id] = out
        return [done[i] for i in ids]
