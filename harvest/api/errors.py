"""OpenAI-style errors: `{"error": {"message", "type", "param", "code"}}` for every failure.

OpenAI SDKs pick the exception class from the status code and show `message`, so every
path (our own checks, pydantic validation, FastAPI's 404/405, the backend being down, a
bug) answers in that shape.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from harvest.api.backend import BackendUnavailable
from harvest.protocol.errors import from_pydantic

log = logging.getLogger(__name__)


class APIError(Exception):
    """An error answered to the client as is."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status_code, headers=headers)


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def model_not_found(model: str) -> APIError:
    return APIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")


def unavailable(message: str) -> APIError:
    return APIError(503, message, type="server_error", code="service_unavailable")


def from_validation(errors: Sequence[dict[str, Any]]) -> APIError:
    """The first pydantic/FastAPI error, named the way OpenAI names a bad parameter."""
    if not errors:
        return invalid("invalid request body")
    first = errors[0]
    loc = tuple(first.get("loc", ()))
    if first.get("type") == "json_invalid":
        detail = first.get("ctx", {}).get("error", "")
        return invalid(f"We could not parse the JSON body of your request: {detail}".rstrip(": "))
    if loc in ((), ("body",)):
        if first.get("type") == "missing":
            return invalid("The request body is missing; send a JSON object.")
        return invalid("The request body must be a JSON object.")
    error = from_pydantic(first)  # worded as the offline readers word it
    return invalid(error.message, param=error.param)


def install_error_handlers(app: FastAPI) -> None:
    async def on_api_error(request: Request, exc: APIError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status_code == 401 else None
        return exc.response(headers)

    async def on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return from_validation(exc.errors()).response()

    async def on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return APIError(exc.status_code, str(exc.detail), type=kind).response(exc.headers)

    async def on_unavailable(request: Request, exc: BackendUnavailable) -> JSONResponse:
        return unavailable(str(exc) or "the model backend is unavailable").response()

    async def on_bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error in %s %s", request.method, request.url.path)
        return APIError(500, "The server had an error while processing your request.",
                        type="server_error").response()  # fmt: skip

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(BackendUnavailable, on_unavailable)
    app.add_exception_handler(Exception, on_bug)
