"""The OpenAI-compatible HTTP app: `build_app(backend)` gives a FastAPI app with no Ray in it.

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models (behind the API
key when one is set), GET /health, GET /metrics. A request is online unless it asks for
`service_tier: "flex"`: then it runs in the offline class, on harvested capacity.
With a `BatchService` (a job store), also OpenAI's Files and Batches APIs (api/files.py,
api/batches.py), whose batches run offline on harvested capacity; without one, those
routes answer 501 saying so.

Bounded at the edge: a body over `max_body_bytes` is refused with 413 as soon as its
Content-Length (or, streamed, its byte count) passes the cap, never read whole;
tokenizing runs in a thread pool, off the event loop; a backend whose online queue is
full answers 429 with Retry-After.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from harvest.api.auth import BearerAuth
from harvest.api.backend import Backend, BackendBusy, BackendUnavailable
from harvest.api.batches import install_batch_routes
from harvest.api.errors import APIError, install_error_handlers, invalid, model_not_found, unavailable
from harvest.api.files import install_file_routes
from harvest.api.generation import ClientDisconnected, Generation
from harvest.api.inputs import Tokenizing
from harvest.api.limits import BodySizeLimit, BodyTooLarge, too_large
from harvest.api.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
)
from harvest.api.streaming import SSEResponse, chat_events, completion_events
from harvest.batch import BatchService
from harvest.engine import RequestOutput
from harvest.protocol import InvalidRequest
from harvest.protocol.requests import request_class_of
from harvest.serving import PROMETHEUS_CONTENT_TYPE

# far above any prompt that fits a context window (a 128k-token prompt is ~0.5 MiB of
# text), small enough that a stray upload cannot fill the replica's memory
DEFAULT_MAX_BODY_BYTES = 8 << 20


def build_app(
    backend: Backend,
    api_key: str | Mapping[str, str] | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    batch: BatchService | None = None,
) -> FastAPI:
    """The app over `backend`; with `api_key` (one key, or {key: tenant name}), /v1 routes need
    `Authorization: Bearer <key>`; with `batch`, the Files and Batches APIs over its job store,
    each tenant seeing its own files and batches."""
    app = FastAPI(title="harvest", summary="OpenAI-compatible online serving for harvest.")
    install_error_handlers(app)
    _install_edge_handlers(app, max_body_bytes)
    route_limits = {"/v1/files": batch.max_upload_bytes} if batch is not None else {}
    app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes, route_limits=route_limits)
    if api_key:
        app.add_middleware(BearerAuth, keys=api_key)
    started = int(time.time())
    tokenizing = Tokenizing()

    def check_model(model: str | None) -> None:
        if model is None:
            raise invalid("Missing required parameter: 'model'.", "model")
        if model not in backend.model_names():
            raise model_not_found(model)

    @app.get("/v1/models", response_model=ModelList)
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=name, created=started) for name in backend.model_names()])

    @app.post("/v1/completions", response_model=CompletionResponse)
    async def completions(body: CompletionRequest, request: Request) -> Response | CompletionResponse:
        check_model(body.model)
        inputs = await tokenizing(body, backend.tokenizer, backend.max_model_len)
        gen = await Generation.start(backend, f"cmpl-{uuid.uuid4().hex}", inputs, request_class_of(body))
        if body.stream:
            return SSEResponse(completion_events(gen, body.model, _include_usage(body)), gen)
        final = await _collect(gen, request)
        choice = CompletionChoice(text=final.text, finish_reason=_finish_reason(final))
        return gen.body(CompletionResponse, body.model, [choice], usage=True)

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse)
    async def chat_completions(
        body: ChatCompletionRequest, request: Request
    ) -> Response | ChatCompletionResponse:
        check_model(body.model)
        inputs = await tokenizing(body, backend.tokenizer, backend.max_model_len)
        gen = await Generation.start(backend, f"chatcmpl-{uuid.uuid4().hex}", inputs, request_class_of(body))
        if body.stream:
            return SSEResponse(chat_events(gen, body.model, _include_usage(body)), gen)
        final = await _collect(gen, request)
        choice = ChatChoice(message=AssistantMessage(content=final.text), finish_reason=_finish_reason(final))
        return gen.body(ChatCompletionResponse, body.model, [choice], usage=True)

    if batch is not None:
        install_file_routes(app, batch)
        install_batch_routes(app, batch, lambda: backend.model_names()[0])
    else:
        _install_batch_stub(app)

    @app.get("/health")
    async def health() -> Response:
        try:
            ok = await backend.health()
        except Exception:
            ok = False
        if not ok:
            return unavailable("the model backend is not healthy").response()
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(await backend.metrics_text(), media_type=PROMETHEUS_CONTENT_TYPE)

    return app


def _install_edge_handlers(app: FastAPI, max_body_bytes: int) -> None:
    async def on_invalid(request: Request, exc: InvalidRequest) -> Response:
        return invalid(exc.message, exc.param, exc.code).response()

    async def on_busy(request: Request, exc: BackendBusy) -> Response:
        # OpenAI's own shape for a request-rate limit
        error = APIError(429, str(exc), type="requests", code="rate_limit_exceeded")
        return error.response({"Retry-After": str(exc.retry_after_s)})

    async def on_too_large(request: Request, exc: Exception) -> Response:  # a streamed body, past the cap
        return too_large(exc.max_bytes if isinstance(exc, BodyTooLarge) else max_body_bytes).response()

    app.add_exception_handler(InvalidRequest, on_invalid)
    app.add_exception_handler(BackendBusy, on_busy)
    app.add_exception_handler(413, on_too_large)


def _install_batch_stub(app: FastAPI) -> None:
    """Files and Batches need a job store: say so rather than answer a bare 404."""

    async def no_store() -> Response:
        message = "The Files and Batches APIs need a job store: this server was started without one."
        return APIError(501, message, type="server_error", code="not_implemented").response()

    for path in ("/v1/files", "/v1/files/{rest:path}", "/v1/batches", "/v1/batches/{rest:path}"):
        app.add_api_route(path, no_store, methods=["GET", "POST", "DELETE"], include_in_schema=False)


async def _collect(gen: Generation, request: Request) -> RequestOutput:
    try:
        return await gen.collect(request)
    except BackendUnavailable as exc:
        raise unavailable(str(exc)) from exc
    except ClientDisconnected:
        # nobody reads this answer; the status is for access logs (nginx's "client closed")
        raise APIError(499, "client closed the request") from None
    finally:
        await gen.close()


def _include_usage(body: CompletionRequest | ChatCompletionRequest) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


def _finish_reason(final: RequestOutput) -> str | None:
    return final.finish_reason.value if final.finish_reason is not None else None
