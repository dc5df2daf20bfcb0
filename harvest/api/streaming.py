"""Server-sent events for streamed completions and chat completions.

The chunk order follows OpenAI: chat opens with `delta.role`, then content deltas, then a
chunk with `finish_reason` and an empty delta; with `stream_options.include_usage` every
chunk carries `"usage": null` and one last chunk with no choices carries the usage. The
stream always ends with `data: [DONE]`, also after an error event.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from harvest.api.backend import BackendUnavailable
from harvest.api.errors import APIError
from harvest.api.generation import Generation, error_event_body
from harvest.api.schemas import (
    ChatChunkChoice,
    ChatCompletionChunk,
    CompletionChoice,
    CompletionResponse,
    Usage,
)

DONE = "data: [DONE]\n\n"


def sse(payload: BaseModel | dict, include_usage: bool = True) -> str:
    if isinstance(payload, BaseModel):
        data = payload.model_dump_json(exclude=None if include_usage else {"usage"})
    else:
        data = json.dumps(payload)
    return f"data: {data}\n\n"


class SSEResponse(StreamingResponse):
    """An event stream whose request is aborted however the stream ends.

    Starlette cancels the body iterator when the client disconnects (or, with ASGI 2.4
    servers, stops iterating when a send fails); either way the generation is closed here.
    """

    def __init__(self, events: AsyncIterator[str], generation: Generation) -> None:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(events, media_type="text/event-stream", headers=headers)
        self.generation = generation

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()  # type: ignore[attr-defined]  # our async generators
            await self.generation.close()


async def completion_events(gen: Generation, model: str, include_usage: bool) -> AsyncIterator[str]:
    def chunk(text: str, finish_reason: str | None) -> str:
        choice = CompletionChoice(text=text, finish_reason=finish_reason)
        return sse(CompletionResponse(id=gen.request_id, created=gen.created, model=model, choices=[choice],
                                      service_tier=gen.service_tier), include_usage)  # fmt: skip

    try:
        async for out in gen:
            if out.delta_text or out.finished:
                yield chunk(out.delta_text, out.finish_reason.value if out.finished else None)
        if include_usage:
            usage = Usage.of(*gen.usage_tokens())
            yield sse(CompletionResponse(id=gen.request_id, created=gen.created, model=model, choices=[],
                                         usage=usage, service_tier=gen.service_tier))  # fmt: skip
    except (BackendUnavailable, APIError) as exc:  # the server stopped, or failed on this request
        yield sse(error_event_body(exc))
    yield DONE


async def chat_events(gen: Generation, model: str, include_usage: bool) -> AsyncIterator[str]:
    def chunk(delta: dict[str, str], finish_reason: str | None = None) -> str:
        choice = ChatChunkChoice(delta=delta, finish_reason=finish_reason)
        return sse(ChatCompletionChunk(id=gen.request_id, created=gen.created, model=model, choices=[choice],
                                       service_tier=gen.service_tier), include_usage)  # fmt: skip

    yield chunk({"role": "assistant", "content": ""})
    try:
        async for out in gen:
            if out.delta_text:
                yield chunk({"content": out.delta_text})
            if out.finished:
                yield chunk({}, out.finish_reason.value)
        if include_usage:
            usage = Usage.of(*gen.usage_tokens())
            yield sse(ChatCompletionChunk(id=gen.request_id, created=gen.created, model=model, choices=[],
                                          usage=usage, service_tier=gen.service_tier))  # fmt: skip
    except (BackendUnavailable, APIError) as exc:  # the server stopped, or failed on this request
        yield sse(error_event_body(exc))
    yield DONE
