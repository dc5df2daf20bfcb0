"""The Batches API routes: create, retrieve, list, cancel. Each batch is a harvest job.

Creating one validates the whole input file (two passes, like `harvest submit`) in a
thread, so a large file never stalls the event loop; the answer comes once the job is
queued (`in_progress`) or rejected (`failed`, its `errors.data[]` naming the lines).

`completion_window` is OpenAI's `24h` or any whole number of minutes, hours or days
(`30m`, `1h`, `2d`) within the service's bounds (default 5m to 7d): the batch's deadline,
which orders its shards against every other job's (docs/QUEUE.md). Every route acts for the
request's tenant; another tenant's batch answers 404 as a missing one does.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Query, Request
from pydantic import BaseModel, Field, field_validator

from harvest.api.auth import tenant_of
from harvest.api.errors import APIError, invalid
from harvest.api.files import list_page
from harvest.batch import BatchService
from harvest.batch.batches import BatchInputError, BatchView

_WINDOW = re.compile(r"^([1-9]\d{0,6})([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class BatchCreate(BaseModel):
    input_file_id: str
    endpoint: str
    completion_window: str = Field(description="OpenAI's '24h', or a shorter window such as '1h', '30m'")
    metadata: dict[str, str] | None = None

    @field_validator("metadata")
    @classmethod
    def _openai_metadata_limits(cls, metadata: dict[str, str] | None) -> dict[str, str] | None:
        if metadata is not None and (
            len(metadata) > 16 or any(len(k) > 64 or len(v) > 512 for k, v in metadata.items())
        ):
            raise ValueError(
                "metadata holds at most 16 pairs, keys of up to 64 and values of up to 512 characters"
            )
        return metadata


def _span(seconds: float) -> str:
    for unit in "dhm":
        if seconds >= _UNIT_S[unit] and seconds % _UNIT_S[unit] == 0:
            return f"{int(seconds // _UNIT_S[unit])}{unit}"
    return f"{seconds:g}s"


def window_seconds(window: str, min_s: float, max_s: float) -> float:
    """`completion_window` in seconds; an APIError naming it when it is no duration in bounds."""
    m = _WINDOW.match(window)
    seconds = int(m.group(1)) * _UNIT_S[m.group(2)] if m else None
    if seconds is None or not min_s <= seconds <= max_s:
        raise invalid(
            f"completion_window must be a duration such as 24h, 1h or 30m, from {_span(min_s)} to "
            f"{_span(max_s)}; got {window!r}",
            "completion_window",
        )
    return float(seconds)


def no_such_batch(batch_id: str) -> APIError:
    return APIError(404, f"No such Batch object: {batch_id}", param="batch_id", code="batch_not_found")


def install_batch_routes(app: FastAPI, service: BatchService, model_name: Callable[[], str]) -> None:
    """`model_name`: the model the app serves, named in every output line's body."""

    def found(view: BatchView | None, batch_id: str) -> dict[str, Any]:
        if view is None:
            raise no_such_batch(batch_id)
        return view.to_openai()

    @app.post("/v1/batches")
    async def create(body: BatchCreate, request: Request) -> dict[str, Any]:
        window_s = window_seconds(body.completion_window, service.min_window_s, service.max_window_s)
        try:
            view = await asyncio.to_thread(
                service.batches.create,
                body.input_file_id,
                body.endpoint,
                body.completion_window,
                window_s,
                body.metadata,
                model_name(),
                tenant_of(request),
            )
        except BatchInputError as exc:
            if exc.not_found:
                raise APIError(404, str(exc), param=exc.param, code="file_not_found") from None
            raise invalid(str(exc), exc.param) from None
        return view.to_openai()

    @app.get("/v1/batches/{batch_id}")
    async def retrieve(batch_id: str, request: Request) -> dict[str, Any]:
        view = await asyncio.to_thread(service.batches.get, batch_id, tenant_of(request), fresh_eta=True)
        return found(view, batch_id)

    @app.get("/v1/batches")
    async def list_batches(
        request: Request, limit: int = Query(20, ge=1, le=100), after: str | None = None
    ) -> dict[str, Any]:
        views, has_more = await asyncio.to_thread(service.batches.list, limit, after, tenant_of(request))
        return list_page([v.to_openai() for v in views], has_more)

    @app.post("/v1/batches/{batch_id}/cancel")
    async def cancel(batch_id: str, request: Request) -> dict[str, Any]:
        return found(await asyncio.to_thread(service.batches.cancel, batch_id, tenant_of(request)), batch_id)
