"""RayBackend: the `Backend` protocol over the controller and its GPU worker actors.

Runs inside the Serve ingress replica. Routing follows the controller's load view
(refreshed at most every `route_ttl_s`); tokens stream back from the chosen worker as a
Ray streaming generator. A worker that dies mid-request surfaces as 503. The TTFT/TPOT seen
here go to the controller, which tightens a worker's engine targets when they miss the SLO.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import asdict
from typing import Any

import ray
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from harvest.api.backend import BackendUnavailable
from harvest.engine import RequestOutput, SamplingParams
from harvest.serving import render_engine_metrics

REPORT_S = 0.5


class RayBackend:
    def __init__(self, controller: Any, model: str, model_name: str, route_ttl_s: float = 0.25) -> None:
        self.controller = controller
        self.model_name = model_name
        self._tokenizer = AutoTokenizer.from_pretrained(model)
        self.route_ttl_s = route_ttl_s
        self._route: list[str] = []
        self._route_time = 0.0
        self._refreshing: asyncio.Task | None = None
        self._handles: dict[str, Any] = {}
        self._inflight: dict[str, Any] = {}
        self._max_model_len: int | None = None
        # latencies seen here per worker, sent to the controller every REPORT_S (feedback.py)
        self._observed: dict[str, dict[str, list[float]]] = {}
        self._reported = time.monotonic()

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self._tokenizer

    @property
    def max_model_len(self) -> int:
        if self._max_model_len is None:
            workers = ray.get(self.controller.status.remote())["workers"]
            limits = [min(s["max_model_len"], s["capacity_tokens"]) for s in workers.values()]
            if not limits:
                raise BackendUnavailable("no worker is ready yet")
            self._max_model_len = min(limits)
        return self._max_model_len

    def model_names(self) -> list[str]:
        return [self.model_name]

    async def _refresh_route(self) -> None:
        try:
            self._route = await asyncio.wait_for(self.controller.route.remote(), timeout=2)
            self._route_time = time.monotonic()
        except (asyncio.TimeoutError, ray.exceptions.RayError):
            pass  # controller restarting: the workers still serve, keep routing by the last view

    def _forget(self, worker: str) -> None:
        """After a worker died: the next request waits for a fresh route."""
        self._handles.pop(worker, None)
        self._route_time = 0.0

    def _refresh_pending(self) -> bool:
        return self._refreshing is not None and not self._refreshing.done()

    async def _pick(self) -> tuple[str, Any]:
        if not self._route or not self._route_time:
            await self._refresh_route()
        elif time.monotonic() - self._route_time > self.route_ttl_s and not self._refresh_pending():
            # route by the last view now and refresh it meanwhile: no controller round trip
            # on a request's TTFT (at 3 req/s almost every request found the view stale)
            self._refreshing = asyncio.create_task(self._refresh_route())
        if not self._route:
            raise BackendUnavailable("no GPU worker is available")
        name = self._route[0]
        if name not in self._handles:
            from controller.controller import NAMESPACE

            try:  # workers are named detached actors: no need to go through the controller
                self._handles[name] = ray.get_actor(name, namespace=NAMESPACE)
            except ValueError as exc:
                self._forget(name)
                raise BackendUnavailable(f"worker {name} is gone") from exc
        return name, self._handles[name]

    async def generate(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        name, handle = await self._pick()
        stream = handle.generate.options(num_returns="streaming").remote(
            prompt_token_ids, asdict(params), request_id
        )
        self._inflight[request_id] = handle
        finished, start, first = False, time.monotonic(), None
        try:
            async for ref in stream:
                out: RequestOutput = await ref
                finished = out.finished
                if first is None and out.new_token_ids:
                    first = time.monotonic()
                if finished and first is not None:
                    self._observe(name, first - start, time.monotonic() - first, out.num_output_tokens)
                yield out
        except ray.exceptions.RayTaskError as exc:
            if isinstance(exc.cause, ValueError):
                raise exc.cause from None
            raise BackendUnavailable(f"worker {name} failed: {exc.cause!r}") from exc
        except ray.exceptions.RayActorError as exc:
            self._forget(name)
            raise BackendUnavailable(f"worker {name} died") from exc
        finally:
            self._inflight.pop(request_id, None)
            if not finished:
                handle.abort.remote(request_id)

    def _observe(self, worker: str, ttft_s: float, decode_s: float, tokens: int) -> None:
        seen = self._observed.setdefault(worker, {"ttft_s": [], "tpot_s": []})
        seen["ttft_s"].append(ttft_s)
        if tokens > 1:
            seen["tpot_s"].append(decode_s / (tokens - 1))
        if time.monotonic() - self._reported >= REPORT_S:
            self._reported = time.monotonic()
            self.controller.observe.remote(self._observed)  # fire and forget: never waits on it
            self._observed = {}

    def abort(self, request_id: str) -> None:
        handle = self._inflight.get(request_id)
        if handle is not None:
            handle.abort.remote(request_id)

    async def health(self) -> bool:
        try:
            status = await asyncio.wait_for(self.controller.status.remote(), timeout=5)
        except (asyncio.TimeoutError, ray.exceptions.RayError):
            return False
        return any(s.get("healthy") for s in status["workers"].values())

    async def metrics_text(self) -> str:
        status = await self.controller.status.remote()
        return render_engine_metrics(status["workers"])
