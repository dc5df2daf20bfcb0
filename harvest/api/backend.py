"""The seam between the HTTP layer and whatever runs the model.

`build_app` speaks only to a `Backend`: `LocalBackend` serves it over an `EngineClient`
(an in-process `EngineLoop`: tests, a single-process server); each GPU worker's Serve
replica serves the app over its own engine loop with `WorkerBackend`, a `LocalBackend`
that also feeds its SLO feedback.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol, runtime_checkable

from transformers import PreTrainedTokenizerBase

from harvest.protocol.sampling_params import SamplingParams
from harvest.protocol.types import RequestClass, RequestOutput


class BackendUnavailable(Exception):
    """The backend cannot take the request now (stopped, dead): HTTP 503."""


class BackendBusy(Exception):
    """The backend's online queue is full: HTTP 429 with `Retry-After`, so that clients
    (the OpenAI SDKs retry 429s) back off instead of piling on."""

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@runtime_checkable
class Backend(Protocol):
    """What the OpenAI-compatible app needs from the serving side.

    `tokenizer` and `max_model_len` are read on every request, so they must be cheap
    (load them once). Prompts arrive already tokenized and validated against
    `max_model_len`: prompt + max_tokens fits, so the backend need not check it again.
    """

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The model's tokenizer: chat templates and prompt token counts."""
        ...

    @property
    def max_model_len(self) -> int:
        """Most tokens (prompt + output) one request may hold."""
        ...

    def model_names(self) -> list[str]:
        """Names accepted in the `model` field; the first is the one served by default."""
        ...

    def generate(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        request_id: str,
        request_class: RequestClass = RequestClass.ONLINE,
    ) -> AsyncIterator[RequestOutput]:
        """Run one request; yields its step outputs with `delta_text`, the last `finished`.

        `request_class` is online, or offline for a flex-tier request: it runs on harvested
        capacity, preemptible, and stays out of the online queue, its limit and its SLO.
        Raises `BackendUnavailable` (before or during the stream) when it cannot serve it,
        `BackendBusy` (before the first output) when the queue of its class is full,
        and `ValueError` for a request the engine refuses (answered as a 400).
        Closing or cancelling the iterator early must abort the request; the app also calls
        `abort` then, so both paths must be harmless when repeated.
        """
        ...

    def abort(self, request_id: str) -> None:
        """Abort a request, fire and forget: it is called from cleanup code that may be
        in a cancelled task, so it must not block or await. Unknown ids are ignored."""
        ...

    async def health(self) -> bool:
        """True while the backend can serve requests."""
        ...

    async def metrics_text(self) -> str:
        """Prometheus text exposition (format 0.0.4) of the backend's metrics."""
        ...
