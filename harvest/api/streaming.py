"""Server-sent events for streamed completions and chat completions.

The chunk order follows OpenAI: chat opens with `delta.role`, then content deltas, then a
chunk with `finish_reason` and an empty delta; with `stream_options.include_usage` every
chunk carries `"usage": null` and one last chunk with no choices carries the usage. The
stream always ends with `data: [DONE]`, also after an error event.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Sequence

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
)
from harvest.engine import RequestOutput

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


def completion_events(gen: Generation, model: str, include_usage: bool) -> AsyncIterator[str]:
    def choices(out: RequestOutput) -> list[CompletionChoice]:
        if out.finished:
            return [CompletionChoice(text=out.delta_text, finish_reason=out.finish_reason.value)]
        return [CompletionChoice(text=out.delta_text)] if out.delta_text else []

    return _events(gen, CompletionResponse, model, include_usage, choices)


def chat_events(gen: Generation, model: str, include_usage: bool) -> AsyncIterator[str]:
    def choices(out: RequestOutput) -> list[ChatChunkChoice]:
        deltas = [ChatChunkChoice(delta={"content": out.delta_text})] if out.delta_text else []
        if out.finished:
            deltas.append(ChatChunkChoice(delta={}, finish_reason=out.finish_reason.value))
        return deltas

    opening = ChatChunkChoice(delta={"role": "assistant", "content": ""})
    return _events(gen, ChatCompletionChunk, model, include_usage, choices, opening)


async def _events(
    gen: Generation,
    cls: type[CompletionResponse] | type[ChatCompletionChunk],
    model: str,
    include_usage: bool,
    choices: Callable[[RequestOutput], Sequence[BaseModel]],
    opening: BaseModel | None = None,
) -> AsyncIterator[str]:
    """The stream: the `opening` chunk, a chunk for each choice `choices` makes of an output,
    the usage chunk if asked for, and [DONE], after an error event if it fails part-way."""
    if opening is not None:
        yield sse(gen.body(cls, model, [opening]), include_usage)
    try:
        async for out in gen:
            for choice in choices(out):
                yield sse(gen.body(cls, model, [choice]), include_usage)
        if include_usage:
            yield sse(gen.body(cls, model, [], usage=True))
    except (BackendUnavailable, APIError) as exc:  # the server stopped, or failed on this request
        yield sse(error_event_body(exc))
    yield DONE
