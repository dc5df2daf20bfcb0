"""BodySizeLimit: refuse a request body over the cap with an OpenAI-style 413, unread.

Starlette has a body limit of its own, but it answers in plain text and replaces any
response to a request whose Content-Length is over the cap with its own, so OpenAI
clients would not get the `{"error": ...}` body they parse. This one refuses a declared
oversize body before the app runs, and counts the bytes of a streamed (chunked) body as
they arrive, so at most `max_bytes` plus one chunk is ever read.

The cap is per route: `route_limits` maps a path to its own cap (POST /v1/files takes a
file of up to 200 MB; a completion body has no business being that large).
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from harvest.api.errors import APIError


class BodyTooLarge(HTTPException):
    """Raised from `receive` past the cap; an HTTPException so that FastAPI passes it to
    the app's handler for 413 instead of calling it a parse error (400)."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, "request body too large")
        self.max_bytes = max_bytes


def too_large(max_bytes: int) -> APIError:
    message = f"The request body is larger than the server's limit of {max_bytes} bytes."
    return APIError(413, message, code="request_too_large")


class BodySizeLimit:
    def __init__(self, app: ASGIApp, max_bytes: int, route_limits: dict[str, int] | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.route_limits = route_limits or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        max_bytes = self.route_limits.get(scope["path"].rstrip("/"), self.max_bytes)
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > max_bytes:
            await too_large(max_bytes).response()(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > max_bytes:
                    raise BodyTooLarge(max_bytes)
            return message

        await self.app(scope, counted, send)
