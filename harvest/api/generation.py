"""One request's run on the backend, as the HTTP handlers see it.

The first output is awaited before any response starts, so a backend that refuses the
request still gets a proper status code (503, 400, or 500 when the engine failed on it at
once) instead of a broken 200 stream.
From then on the request must end in the engine however the client behaves: `close()`
aborts it unless it finished, and handlers call it on every path.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any, TypeVar

from starlette.requests import Request

from harvest.api.backend import Backend, BackendUnavailable
from harvest.api.errors import APIError, invalid, unavailable
from harvest.api.inputs import EngineInputs
from harvest.api.schemas import ChatCompletionChunk, ChatCompletionResponse, CompletionResponse, Usage
from harvest.engine import FinishReason, RequestClass, RequestOutput
from harvest.protocol.requests import served_tier

# what OpenAI wraps in one envelope (id, created, model, tier): whole answers and stream chunks
Body = TypeVar("Body", CompletionResponse, ChatCompletionResponse, ChatCompletionChunk)


class ClientDisconnected(Exception):
    """The client went away before its (non-streamed) answer was ready."""


class Generation:
    """A started request: its outputs, its usage counts and the way to end it."""

    def __init__(
        self,
        backend: Backend,
        request_id: str,
        prompt_tokens: int,
        outputs: AsyncIterator[RequestOutput],
        first: RequestOutput,
        request_class: RequestClass = RequestClass.ONLINE,
    ) -> None:
        self.backend = backend
        self.request_id = request_id
        self.prompt_tokens = prompt_tokens
        self.service_tier = served_tier(request_class)  # echoed in every response body and chunk
        self.created = int(time.time())
        self.final: RequestOutput | None = None
        self._outputs = outputs
        self._first: RequestOutput | None = first

    @classmethod
    async def start(
        cls,
        backend: Backend,
        request_id: str,
        inputs: EngineInputs,
        request_class: RequestClass = RequestClass.ONLINE,
    ) -> Generation:
        """`request_class`: online, or offline for a flex-tier request."""
        outputs = backend.generate(inputs.prompt_token_ids, inputs.params, request_id, request_class)
        try:
            first = await anext(outputs)
        except BackendUnavailable as exc:
            raise unavailable(str(exc) or "the model backend is unavailable") from exc
        except ValueError as exc:  # the engine refused the request itself
            raise invalid(str(exc)) from exc
        except StopAsyncIteration:
            raise unavailable("the backend ended the request without any output") from None
        except BaseException:
            backend.abort(request_id)
            raise
        if first.finish_reason is FinishReason.ERROR:
            await outputs.aclose()
            raise engine_error(first)
        return cls(backend, request_id, len(inputs.prompt_token_ids), outputs, first, request_class)

    @property
    def finished(self) -> bool:
        return self.final is not None

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        """Outputs up to the finished one; `BackendUnavailable` if the server aborted it,
        `APIError` (500) if the engine failed on it."""
        if self._first is not None:
            first, self._first = self._first, None
            yield self._check(first)
            if first.finished:
                return
        async for out in self._outputs:
            yield self._check(out)
            if out.finished:
                return
        raise BackendUnavailable("the backend ended the request before it finished")

    def _check(self, out: RequestOutput) -> RequestOutput:
        if out.finished:
            self.final = out
            if out.finish_reason is FinishReason.ABORT:
                # nobody here asked for it: the worker was stopped or drained
                raise BackendUnavailable("the request was aborted by the server")
            if out.finish_reason is FinishReason.ERROR:
                raise engine_error(out)
        return out

    async def collect(self, request: Request | None = None) -> RequestOutput:
        """Run to the end; with `request`, give up (ClientDisconnected) if its client leaves."""

        async def run() -> RequestOutput:
            async for _ in self:
                pass
            assert self.final is not None
            return self.final

        if request is None:
            return await run()
        runner = asyncio.ensure_future(run())
        watcher = asyncio.ensure_future(_disconnected(request))
        try:
            done, _ = await asyncio.wait({runner, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not runner.done():
                runner.cancel()  # its CancelledError aborts the request in the backend
                await asyncio.wait({runner})  # so that close() does not race a running generator
        if runner in done:
            return runner.result()
        raise ClientDisconnected(self.request_id)

    async def close(self) -> None:
        """Abort the request unless it finished; safe to call more than once."""
        if not self.finished:
            self.backend.abort(self.request_id)  # first: the await below may be cancelled
        await self._outputs.aclose()

    def usage_tokens(self) -> tuple[int, int]:
        assert self.final is not None
        return self.prompt_tokens, self.final.num_output_tokens

    def body(self, cls: type[Body], model: str, choices: list[Any], usage: bool = False) -> Body:
        """A response body or stream chunk of this request around `choices`; with `usage`
        (once it finished), its token counts."""
        counts = Usage.of(*self.usage_tokens()) if usage else None
        return cls(
            id=self.request_id,
            created=self.created,
            model=model,
            choices=choices,
            usage=counts,
            service_tier=self.service_tier,
        )


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def engine_error(out: RequestOutput) -> APIError:
    """This request (alone: the engine serves on) failed inside the engine."""
    message = f"The server had an error while processing your request: {out.error or 'unknown error'}"
    return APIError(500, message, type="server_error", code="engine_error")


def error_event_body(exc: BaseException) -> dict:
    """What a stream sends in place of its next chunk when it fails part-way."""
    if isinstance(exc, APIError):
        return exc.body()
    return unavailable(str(exc) or "the model backend is unavailable").body()
