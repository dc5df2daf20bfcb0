"""LocalBackend: the `Backend` protocol over one `EngineClient` (an in-process `EngineLoop`)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from transformers import PreTrainedTokenizerBase

from harvest.api.backend import BackendBusy, BackendUnavailable
from harvest.protocol.engine_client import EngineClient, EngineLoopError
from harvest.protocol.sampling_params import SamplingParams
from harvest.protocol.types import RequestClass, RequestOutput
from harvest.serving.metrics import render_engine_metrics


class LocalBackend:
    """Serves online requests from the engine behind `loop` under `model_name` (tests, a
    one-process server).

    `max_pending` caps unfinished online requests (None: no cap); past it new requests get
    429 with Retry-After (`BackendBusy`) rather than queueing without bound. `max_stall_s`
    is the health check's limit on a step that does not finish.
    """

    def __init__(
        self,
        loop: EngineClient,
        model_name: str | list[str],  # several: any of them may be passed as `model`
        *,
        max_pending: int | None = None,
        max_stall_s: float = 30.0,
    ) -> None:
        self.loop = loop
        self.names = [model_name] if isinstance(model_name, str) else list(model_name)
        self.model_name = self.names[0]
        self.max_pending = max_pending
        self.max_stall_s = max_stall_s

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.loop.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.loop.limits.max_request_tokens

    def model_names(self) -> list[str]:
        return list(self.names)

    async def generate(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        if self.max_pending is not None and self.loop.num_pending(RequestClass.ONLINE) >= self.max_pending:
            raise BackendBusy(f"too many requests in flight (limit {self.max_pending}); retry shortly")
        outputs = self.loop.generate(prompt_token_ids, params, request_id, RequestClass.ONLINE,
                                     stream_text=True)  # fmt: skip
        try:
            async for out in outputs:
                yield out
        except EngineLoopError as exc:
            raise BackendUnavailable(str(exc)) from exc
        finally:
            await outputs.aclose()  # aborts the engine request if we leave early

    def abort(self, request_id: str) -> None:
        self.loop.abort(request_id)

    async def health(self) -> bool:
        return self.loop.healthy(self.max_stall_s)

    async def metrics_text(self) -> str:
        return render_engine_metrics({self.model_name: self.loop.stats(self.max_stall_s)})
