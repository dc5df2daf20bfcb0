"""The engine: `step()` is schedule -> execute -> update."""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence

from transformers import AutoTokenizer

from harvest.engine.block_manager import BlockManager
from harvest.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from harvest.engine.detokenizer import Detokenizer
from harvest.engine.model_runner import DTYPES, ModelRunner, load_shape
from harvest.engine.request import FinishReason, Request, RequestClass, RequestOutput, RequestStatus
from harvest.engine.sampling import SamplingParams, sample
from harvest.engine.scheduler import ScheduledBatch, Scheduler


class Engine:
    """One model replica with a paged KV pool and continuous batching.

    Single-threaded by design: callers (the Ray worker, the local job loop) own the loop
    and call `add_request`/`abort` between steps.
    """

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        shape = load_shape(config.model)
        max_len = config.max_model_len or shape.max_position_embeddings
        if shape.sliding_window:
            max_len = min(max_len, shape.sliding_window)  # we attend over full context only
        self.max_model_len = max_len
        cache = config.cache
        num_blocks = cache.num_blocks or self._blocks_for(
            cache, shape.block_bytes(cache.block_size, DTYPES[config.dtype])
        )
        self.tokenizer = AutoTokenizer.from_pretrained(config.model)
        self.runner = ModelRunner(config.model, config.device, config.dtype, num_blocks, cache.block_size)
        self.block_manager = BlockManager(num_blocks, cache.block_size)
        self.scheduler = Scheduler(config.scheduler, self.block_manager)
        self.requests: dict[str, Request] = {}
        self._detokenizers: dict[str, Detokenizer] = {}
        self._ids = itertools.count()
        self.eos_token_ids = self._eos_ids()
        self.num_steps = 0

    @classmethod
    def from_pretrained(cls, model: str, **kwargs) -> Engine:
        """`Engine.from_pretrained(path, device=..., num_blocks=..., max_num_seqs=...)`."""
        cache = CacheConfig(
            **{k: kwargs.pop(k) for k in ("block_size", "num_blocks", "kv_cache_bytes") if k in kwargs}
        )
        sched = SchedulerConfig(
            **{k: kwargs.pop(k) for k in ("max_num_batched_tokens", "max_num_seqs") if k in kwargs}
        )
        return cls(EngineConfig(model=model, cache=cache, scheduler=sched, **kwargs))

    def _blocks_for(self, cache: CacheConfig, block_bytes: int) -> int:
        enough = self.config.scheduler.max_num_seqs * -(-self.max_model_len // cache.block_size)
        return max(1, min(cache.kv_cache_bytes // block_bytes, enough))

    def _eos_ids(self) -> set[int]:
        eos = self.runner.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        return set(eos) if isinstance(eos, list) else ({eos} if eos is not None else set())

    @property
    def capacity_tokens(self) -> int:
        return self.block_manager.num_blocks * self.block_manager.block_size

    # ------------------------------------------------------------------ requests

    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        request_class: RequestClass | str = RequestClass.OFFLINE,
        stream_text: bool = False,
        arrival_time: float | None = None,
    ) -> str:
        """Queue a request; returns its id. `stream_text` adds text deltas to step outputs."""
        params = params or SamplingParams()
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise ValueError(f"duplicate request id {request_id!r}")
        limit = min(self.max_model_len, self.capacity_tokens)
        if len(ids) >= limit:
            raise ValueError(f"prompt has {len(ids)} tokens; this engine takes at most {limit - 1}")
        req = Request(request_id, ids, params, RequestClass(request_class), arrival_time)
        self.requests[request_id] = req
        if stream_text or params.stop:
            self._detokenizers[request_id] = Detokenizer(self.tokenizer, params.stop)
        self.scheduler.add(req)
        return request_id

    def abort(self, request_id: str) -> RequestOutput | None:
        req = self.requests.get(request_id)
        if req is None or req.is_finished:
            return None
        self._finish(req, FinishReason.ABORT)
        return self._final_output(req)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ------------------------------------------------------------------ the loop

    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        if not batch:
            return []
        logits = self.runner.execute(batch.requests, batch.num_new_tokens)
        outputs = self._update(batch, logits)
        self.num_steps += 1
        return outputs

    def _update(self, batch: ScheduledBatch, logits) -> list[RequestOutput]:
        sampling = [
            r
            for r, n in zip(batch.requests, batch.num_new_tokens)
            if r.num_computed_tokens + n == r.num_tokens
        ]
        for req, n in zip(batch.requests, batch.num_new_tokens):
            req.num_computed_tokens += n
        token_ids = sample(logits, [r.params for r in sampling], [r.generator for r in sampling])
        now = time.monotonic()
        outputs = []
        for req, token in zip(sampling, token_ids):
            req.token_ids.append(token)
            if req.first_token_time is None:
                req.first_token_time = now
            detok = self._detokenizers.get(req.request_id)
            delta = detok.push(token) if detok is not None else ""
            reason = self._finish_reason(req, token, detok)
            if reason is not None:
                self._finish(req, reason)
                outputs.append(self._final_output(req, [token], delta))
            else:
                text = detok.text[: detok.emitted] if detok is not None else ""
                outputs.append(RequestOutput(req.request_id, [token], req.output_token_ids, text, delta))
        return outputs

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
        self.scheduler.finish(req)
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason

    def _final_output(
        self, req: Request, new_token_ids: list[int] | None = None, delta: str = ""
    ) -> RequestOutput:
        self.requests.pop(req.request_id, None)
        detok = self._detokenizers.pop(req.request_id, None)
        output_ids = req.output_token_ids
        if detok is not None:
            delta += detok.flush()
            text = detok.text
        else:
            keep = output_ids
            if req.finish_reason is FinishReason.STOP and keep and keep[-1] in self.eos_token_ids:
                keep = keep[:-1]
            text = self.tokenizer.decode(keep, skip_special_tokens=True)
        metrics = {"arrival_time": req.arrival_time, "finish_time": time.monotonic()}
        if req.first_token_time is not None:
            metrics["first_token_time"] = req.first_token_time
        return RequestOutput(
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
            metrics=metrics,
        )

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
