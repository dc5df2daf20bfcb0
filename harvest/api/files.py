"""The Files API routes: upload (streamed to the file store), list, retrieve, content, delete.

An upload never sits in memory whole: the multipart body is parsed as it arrives and the
file part's bytes go to the store in chunks of `WRITE_CHUNK`, each write in a thread (a
store may be a network filesystem). Past the size limit the upload is refused with 413
and what was written of it deleted; so is one that fails any other way.

Each route acts for the request's tenant (api/auth.py): another tenant's file answers 404,
exactly as a file that does not exist, so ids reveal nothing across tenants.
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal
from urllib.parse import quote

from fastapi import FastAPI, Query, Request
from fastapi.responses import StreamingResponse

from harvest.api.auth import tenant_of
from harvest.api.errors import APIError, invalid
from harvest.api.multipart import MultipartError, MultipartParser, PartData, PartEnd, PartStart, boundary_of
from harvest.batch import BatchService, FileRecord, FileTooLarge
from harvest.batch.files import UPLOAD_PURPOSES, Upload

WRITE_CHUNK = 1 << 20
MAX_FIELD_BYTES = 1 << 10  # `purpose` and any other plain field


def list_page(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    """OpenAI's cursor page: the SDKs ask for the next one `after` the last id while `has_more`."""
    first, last = (data[0]["id"], data[-1]["id"]) if data else (None, None)
    return {"object": "list", "data": data, "has_more": has_more, "first_id": first, "last_id": last}


def no_such_file(file_id: str) -> APIError:
    return APIError(404, f"No such File object: {file_id}", param="id", code="file_not_found")


def install_file_routes(app: FastAPI, service: BatchService) -> None:
    # routes added to the app itself: an included router holds a lock, and the app must
    # pickle (Serve ships it to each replica)
    async def record_of(file_id: str, request: Request) -> FileRecord:
        record = await asyncio.to_thread(service.files.get, file_id, tenant_of(request))
        if record is None:
            raise no_such_file(file_id)
        return record

    @app.post("/v1/files")
    async def upload(request: Request) -> dict[str, Any]:
        try:
            record = await _receive(service, request)
        except MultipartError as exc:
            raise invalid(str(exc)) from None
        except FileTooLarge as exc:
            raise APIError(413, str(exc), param="file", code="file_too_large") from None
        return record.to_openai()

    @app.get("/v1/files")
    async def list_files(
        request: Request,
        purpose: str | None = None,
        limit: int = Query(10000, ge=1, le=10000),
        after: str | None = None,
        order: Literal["asc", "desc"] = "desc",
    ) -> dict[str, Any]:
        records, has_more = await asyncio.to_thread(
            service.files.list, purpose, limit, after, order, tenant_of(request)
        )
        return list_page([r.to_openai() for r in records], has_more)

    @app.get("/v1/files/{file_id}")
    async def retrieve(file_id: str, request: Request) -> dict[str, Any]:
        return (await record_of(file_id, request)).to_openai()

    @app.get("/v1/files/{file_id}/content")
    async def content(file_id: str, request: Request) -> StreamingResponse:
        record = await record_of(file_id, request)
        # a sync iterator: Starlette reads it in a thread pool, a chunk at a time
        chunks = service.files.store.iter_bytes(record.key)
        # RFC 6266's UTF-8 form: header values are latin-1, a filename may be anything
        disposition = f"attachment; filename*=UTF-8''{quote(record.filename)}"
        headers = {"Content-Length": str(record.bytes), "Content-Disposition": disposition}
        return StreamingResponse(chunks, media_type="application/jsonl", headers=headers)

    @app.delete("/v1/files/{file_id}")
    async def delete(file_id: str, request: Request) -> dict[str, Any]:
        if not await asyncio.to_thread(service.files.delete, file_id, tenant_of(request)):
            raise no_such_file(file_id)
        return {"id": file_id, "object": "file", "deleted": True}


async def _receive(service: BatchService, request: Request) -> FileRecord:
    """Parse the multipart body as it arrives, streaming the `file` part into a new file."""
    parser = MultipartParser(boundary_of(request.headers.get("content-type")))
    fields: dict[str, bytearray] = {}
    upload: Upload | None = None
    current: str | None = None  # the part being read: a field's name, or "file"
    pending = bytearray()
    try:
        async for chunk in request.stream():
            for event in parser.feed(chunk):
                if isinstance(event, PartStart):
                    if event.name == "file" and event.filename is not None:
                        if upload is not None:
                            raise MultipartError("send one file per upload")
                        upload = await asyncio.to_thread(
                            service.files.start, event.filename, owner=tenant_of(request)
                        )
                        current = "file"
                    else:
                        current = event.name
                        fields[current] = bytearray()
                elif isinstance(event, PartData) and current == "file":
                    pending += event.data
                    if len(pending) >= WRITE_CHUNK:
                        await asyncio.to_thread(upload.write, bytes(pending))
                        pending.clear()
                elif isinstance(event, PartData) and current is not None:
                    fields[current] += event.data
                    if len(fields[current]) > MAX_FIELD_BYTES:
                        raise MultipartError(f"form field {current!r} is too long")
                elif isinstance(event, PartEnd) and current == "file" and pending:
                    await asyncio.to_thread(upload.write, bytes(pending))
                    pending.clear()
        parser.close()
        purpose = fields.get("purpose", bytearray()).decode("utf-8", "replace")
        if upload is None:
            raise invalid("Missing required parameter: 'file'.", "file")
        if purpose not in UPLOAD_PURPOSES:
            raise invalid(f"purpose must be one of {', '.join(UPLOAD_PURPOSES)}, got {purpose!r}", "purpose")
        return await asyncio.to_thread(upload.commit)
    except BaseException:
        if upload is not None:
            await asyncio.to_thread(upload.abort)
        raise
