"""LocalBackend: the `Backend` protocol over one `EngineClient` (an in-process `EngineLoop`)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from transformers import PreTrainedTokenizerBase

from harvest.api.backend import BackendBusy, BackendUnavailable
from harvest.protocol.engine_client import EngineClient, EngineLoopError
from harvest.protocol.sampling_params import SamplingParams
from harvest.protocol.types import FLEX_PRIORITY, RequestClass, RequestOutput
from harvest.serving.metrics import render_engine_metrics


class LocalBackend:
    """Serves HTTP requests from the engine behind `loop` under `model_name` (tests, a
    one-process server).

    `max_pending` caps unfinished online requests (None: no cap); past it new requests get
    429 with Retry-After (`BackendBusy`) rather than queueing without bound. Flex requests
    (the offline class) have a cap of their own, `max_pending_flex` (default: the same
    number), so that neither tier's backlog refuses the other's requests; batch shards'
    offline requests count against neither. Flex requests go ahead of batch lines in the
    engine (`FLEX_PRIORITY`). `max_stall_s` is the health check's limit on a step that does
    not finish.
    """

    def __init__(
        self,
        loop: EngineClient,
        model_name: str | list[str],  # several: any of them may be passed as `model`
        *,
        max_pending: int | None = None,
        max_pending_flex: int | None = None,
        max_stall_s: float = 30.0,
    ) -> None:
        self.loop = loop
        self.names = [model_name] if isinstance(model_name, str) else list(model_name)
        self.model_name = self.names[0]
        self.max_pending = max_pending
        self.max_pending_flex = max_pending if max_pending_flex is None else max_pending_flex
        self.max_stall_s = max_stall_s
        # flex requests in flight: the loop's offline count also holds the batch shards' requests
        self.flex_pending = 0

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.loop.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.loop.limits.max_request_tokens

    def model_names(self) -> list[str]:
        return list(self.names)

    async def generate(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        request_id: str,
        request_class: RequestClass = RequestClass.ONLINE,
    ) -> AsyncIterator[RequestOutput]:
        flex = request_class is RequestClass.OFFLINE
        if flex:
            if self.max_pending_flex is not None and self.flex_pending >= self.max_pending_flex:
                raise BackendBusy(f"too many flex requests in flight (limit {self.max_pending_flex}); "
                                  "retry shortly")  # fmt: skip
        elif self.max_pending is not None and self.loop.num_pending(RequestClass.ONLINE) >= self.max_pending:
            raise BackendBusy(f"too many requests in flight (limit {self.max_pending}); retry shortly")
        outputs = self.loop.generate(prompt_token_ids, params, request_id, request_class, stream_text=True,
                                     priority=FLEX_PRIORITY if flex else 0)  # fmt: skip
        self.flex_pending += flex  # on the event loop: no lock needed
        try:
            async for out in outputs:
                yield out
        except EngineLoopError as exc:
            raise BackendUnavailable(str(exc)) from exc
        finally:
            self.flex_pending -= flex
            await outputs.aclose()  # aborts the engine request if we leave early

    def abort(self, request_id: str) -> None:
        self.loop.abort(request_id)

    async def health(self) -> bool:
        return self.loop.healthy(self.max_stall_s)

    async def metrics_text(self) -> str:
        return render_engine_metrics({self.model_name: self.loop.stats(self.max_stall_s)})
