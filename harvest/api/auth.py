"""Bearer-token check for the /v1 routes, as plain ASGI middleware.

Middleware rather than a FastAPI dependency so that it runs before the body is parsed: a
client without the key gets 401, never a 400 about its JSON. /health and /metrics stay
open for probes and scrapers, as in vLLM.
"""

from __future__ import annotations

import secrets

from starlette.types import ASGIApp, Receive, Scope, Send

from harvest.api.errors import APIError


class BearerAuth:
    def __init__(self, app: ASGIApp, api_key: str, prefix: str = "/v1") -> None:
        self.app = app
        self.api_key = api_key.encode()
        self.prefix = prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(self.prefix):
            error = self._check(dict(scope["headers"]).get(b"authorization", b""))
            if error is not None:
                await error.response({"WWW-Authenticate": "Bearer"})(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _check(self, header: bytes) -> APIError | None:
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer" or not token.strip():
            return APIError(401, "You didn't provide an API key. Send it as 'Authorization: Bearer KEY'.",
                            code="invalid_api_key")  # fmt: skip
        if not secrets.compare_digest(token.strip(), self.api_key):
            return APIError(401, "Incorrect API key provided.", code="invalid_api_key")
        return None
