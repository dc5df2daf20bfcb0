"""EngineClient: the one way into an engine, for the HTTP layer, the queue worker and tests.

Requests, resumes, aborts and SLO changes go in; each request's outputs come back through
the sink it was submitted with. Nothing else of the engine is visible: callers never read
its state, and every change reaches it through its owner's inbox, so a caller on any
thread never races the thread that steps it. `harvest.serving.EngineLoop` implements it.
Torch-free, so that the queue can type against it without importing the engine.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from harvest.checkpoint.handle import CheckpointHandle
from harvest.protocol.sampling_params import SamplingParams
from harvest.protocol.types import RequestClass, RequestOutput, RequestState

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

OutputSink = Callable[[RequestOutput], None]
ErrorSink = Callable[[BaseException], None]


class EngineLoopError(RuntimeError):
    """The engine cannot serve the request: it was stopped or its thread died."""


@dataclass(frozen=True)
class EngineLimits:
    """What an engine can hold, fixed when it is built."""

    max_model_len: int  # the model's context (or the configured cap)
    capacity_tokens: int  # tokens the KV pool holds
    max_num_seqs: int  # requests in one step
    block_size: int  # tokens per KV block

    @property
    def max_request_tokens(self) -> int:
        """Most tokens (prompt + output) one request may reach: the engine ends a request
        when the KV pool cannot hold a longer one."""
        return min(self.max_model_len, self.capacity_tokens)


@runtime_checkable
class EngineClient(Protocol):
    """A running engine, seen from any thread. Sinks run on the engine's thread: they must
    be quick and must not block (an assignment under a lock, a `call_soon_threadsafe`)."""

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase: ...

    @property
    def limits(self) -> EngineLimits: ...

    def submit(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        request_id: str | None = None,
        request_class: RequestClass | str = RequestClass.OFFLINE,
        on_output: OutputSink | None = None,
        *,
        on_error: ErrorSink | None = None,
        stream_text: bool = False,
        priority: int = 0,
    ) -> str:
        """Add a request; `on_output` gets each of its step outputs (the last `finished`),
        `on_error` an error if the engine stops first. `priority` orders it within its class,
        lower first (`FLEX_PRIORITY`). Returns the request id."""
        ...

    def generate(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        request_id: str | None = None,
        request_class: RequestClass | str = RequestClass.ONLINE,
        stream_text: bool = True,
        priority: int = 0,
    ) -> AsyncIterator[RequestOutput]:
        """`submit` for asyncio: yields the outputs; leaving early aborts the request."""
        ...

    def resume(
        self, state: RequestState, on_output: OutputSink | None = None, *, on_error: ErrorSink | None = None
    ) -> str:
        """Continue a request exported from an engine that shares this one's checkpoint store."""
        ...

    def resume_from_checkpoint(
        self,
        request_id: str,
        token_ids: list[int],
        params: SamplingParams,
        checkpoint: CheckpointHandle,
        on_output: OutputSink | None = None,
        *,
        on_error: ErrorSink | None = None,
    ) -> str:
        """Continue an offline request from the KV checkpoint an earlier attempt reported
        (`RequestOutput.checkpoint`); `token_ids` is its prompt plus the tokens it had made.
        Without usable blocks it starts over from the tokens, which is as correct."""
        ...

    def export(self, request_ids: list[str], timeout_s: float = 30.0) -> list[RequestState]:
        """Take requests out of the engine, each with its KV checkpoint, for another engine to
        `resume` (a draining worker hands its offline work back this way); their sinks get
        nothing more. Finished ones are skipped. Blocks until done: not for an event loop."""
        ...

    def abort(self, request_id: str) -> None:
        """Abort a request; its sink still gets a final `abort` output. Unknown ids are ignored."""
        ...

    def set_slo(self, ttft_s: float, tpot_s: float) -> None:
        """The latency targets the engine plans offline work against, from the next step on."""
        ...

    def num_pending(self, request_class: RequestClass | str | None = None) -> int:
        """Requests submitted and not finished, of one class or all."""
        ...

    def healthy(self, max_stall_s: float = 30.0) -> bool:
        """False once the engine died, or when it has work but no step finished for `max_stall_s`."""
        ...

    def stats(self, max_stall_s: float = 30.0) -> dict[str, Any]:
        """A JSON-friendly snapshot (health, counters, the last step) for status views and metrics."""
        ...
