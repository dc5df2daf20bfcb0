"""The Batches API routes: create, retrieve, list, cancel. Each batch is a harvest job.

Creating one validates the whole input file (two passes, like `harvest submit`) in a
thread, so a large file never stalls the event loop; the answer comes once the job is
queued (`in_progress`) or rejected (`failed`, its `errors.data[]` naming the lines).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Query
from pydantic import BaseModel, Field, field_validator

from harvest.api.errors import APIError, invalid
from harvest.api.files import list_page
from harvest.batch import BatchService
from harvest.batch.batches import BatchInputError, BatchView
from harvest.client import parse_window


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


def no_such_batch(batch_id: str) -> APIError:
    return APIError(404, f"No such Batch object: {batch_id}", param="batch_id", code="batch_not_found")


def install_batch_routes(app: FastAPI, service: BatchService, model_name: Callable[[], str]) -> None:
    """`model_name`: the model the app serves, named in every output line's body."""

    def found(view: BatchView | None, batch_id: str) -> dict[str, Any]:
        if view is None:
            raise no_such_batch(batch_id)
        return view.to_openai()

    @app.post("/v1/batches")
    async def create(body: BatchCreate) -> dict[str, Any]:
        try:
            window_s = parse_window(body.completion_window)
        except ValueError as exc:
            raise invalid(str(exc), "completion_window") from None
        if not window_s or window_s <= 0:
            raise invalid("completion_window must be a positive duration such as 24h", "completion_window")
        try:
            view = await asyncio.to_thread(
                service.batches.create,
                body.input_file_id,
                body.endpoint,
                body.completion_window,
                window_s,
                body.metadata,
                model_name(),
            )
        except BatchInputError as exc:
            if exc.not_found:
                raise APIError(404, str(exc), param=exc.param, code="file_not_found") from None
            raise invalid(str(exc), exc.param) from None
        return view.to_openai()

    @app.get("/v1/batches/{batch_id}")
    async def retrieve(batch_id: str) -> dict[str, Any]:
        return found(await asyncio.to_thread(service.batches.get, batch_id), batch_id)

    @app.get("/v1/batches")
    async def list_batches(limit: int = Query(20, ge=1, le=100), after: str | None = None) -> dict[str, Any]:
        views, has_more = await asyncio.to_thread(service.batches.list, limit, after)
        return list_page([v.to_openai() for v in views], has_more)

    @app.post("/v1/batches/{batch_id}/cancel")
    async def cancel(batch_id: str) -> dict[str, Any]:
        return found(await asyncio.to_thread(service.batches.cancel, batch_id), batch_id)
