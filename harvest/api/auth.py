"""Bearer-token check for the /v1 routes, as plain ASGI middleware, and the tenants it names.

Middleware rather than a FastAPI dependency so that it runs before the body is parsed: a
client without the key gets 401, never a 400 about its JSON. /health and /metrics stay
open for probes and scrapers, as in vLLM.

Each key is a tenant: the request's tenant name goes into the ASGI scope's state, where the
Files and Batches routes read it (`tenant_of`) to show each tenant only its own. A tenant is
named by the name given with its key (`name:key` in a keys file), else by a short hash of the
key, so the key itself is never stored, logged or shown. Without keys every request is the
one default tenant `""`.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from harvest.api.errors import APIError
from harvest.tenants import DEFAULT_TENANT, tenant_name


def tenant_of(request: Request) -> str:
    return request.scope.get("state", {}).get("tenant", DEFAULT_TENANT)


class BearerAuth:
    """`keys`: one key, or {key: tenant name}."""

    def __init__(self, app: ASGIApp, keys: str | Mapping[str, str], prefix: str = "/v1") -> None:
        self.app = app
        if isinstance(keys, str):
            keys = {keys: tenant_name(keys)}
        self.keys = [(key.encode(), name) for key, name in keys.items()]
        self.prefix = prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(self.prefix):
            tenant = self._tenant(dict(scope["headers"]).get(b"authorization", b""))
            if isinstance(tenant, APIError):
                await tenant.response({"WWW-Authenticate": "Bearer"})(scope, receive, send)
                return
            scope.setdefault("state", {})["tenant"] = tenant
        await self.app(scope, receive, send)

    def _tenant(self, header: bytes) -> str | APIError:
        scheme, _, token = header.partition(b" ")
        token = token.strip()
        if scheme.lower() != b"bearer" or not token:
            return APIError(401, "You didn't provide an API key. Send it as 'Authorization: Bearer KEY'.",
                            code="invalid_api_key")  # fmt: skip
        tenant = None
        for key, name in self.keys:  # every key compared: the time taken says nothing of which matched
            if secrets.compare_digest(token, key):
                tenant = name
        if tenant is None:
            return APIError(401, "Incorrect API key provided.", code="invalid_api_key")
        return tenant
