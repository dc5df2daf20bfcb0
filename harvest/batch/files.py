"""FileRegistry: OpenAI File objects, their records in Redis and their bytes in a FileStore.

A file is two things written in order: its bytes under `<id>.jsonl` in the store, then
its record (`<prefix>:file:<id>`, a hash, and `<prefix>:files`, ids by creation time).
A record therefore always names bytes that are whole; an upload that fails or runs past
the size limit deletes what it wrote and records nothing. Deleting goes the other way
round (record first), so a file is never listed without its bytes.

A file belongs to the tenant that uploaded it (or, for an output file, whose batch wrote
it): `owner` on its record. Every verb takes the caller's tenant and treats another
tenant's file as no file; `None` is the operator's view of all.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

import redis

from harvest.batch.filestore import FileStore

DEFAULT_MAX_FILE_BYTES = 200 * 1000 * 1000  # OpenAI's limit for a batch input file
UPLOAD_PURPOSES = ("batch",)  # what clients upload; harvest itself writes "batch_output"
PURPOSES = (*UPLOAD_PURPOSES, "batch_output")


class FileTooLarge(ValueError):
    def __init__(self, max_bytes: int) -> None:
        super().__init__(f"The file is larger than the limit of {max_bytes} bytes.")
        self.max_bytes = max_bytes


@dataclass
class FileRecord:
    id: str
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: str = "processed"
    owner: str = ""  # the tenant's name; never sent to clients

    @property
    def key(self) -> str:
        """Its name in the FileStore: .jsonl, so the batch readers take it as a batch file."""
        return f"{self.id}.jsonl"

    def to_openai(self) -> dict[str, Any]:
        fields = {k: v for k, v in asdict(self).items() if k != "owner"}
        return {**fields, "object": "file", "expires_at": None, "status_details": None}

    @classmethod
    def from_hash(cls, h: dict[str, str]) -> FileRecord:
        return cls(
            h["id"],
            int(h["bytes"]),
            int(h["created_at"]),
            h["filename"],
            h["purpose"],
            h["status"],
            h.get("owner", ""),
        )


class Upload:
    """One file being written: `write` chunks, then `commit` (recorded) or `abort` (nothing left)."""

    def __init__(
        self, registry: FileRegistry, filename: str, purpose: str, max_bytes: int | None, owner: str = ""
    ) -> None:
        self.registry = registry
        self.owner = owner
        self.id = f"file-{uuid.uuid4().hex[:24]}"
        self.filename = filename
        self.purpose = purpose
        self.max_bytes = max_bytes
        self.size = 0
        self._out = registry.store.writer(f"{self.id}.jsonl")

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self.max_bytes is not None and self.size > self.max_bytes:
            self.abort()
            raise FileTooLarge(self.max_bytes)
        self._out.write(data)

    def commit(self, purpose: str | None = None) -> FileRecord:
        """Close the bytes and record the file (with `purpose`, when it was only known at the end)."""
        self._out.close()
        record = FileRecord(
            self.id, self.size, int(time.time()), self.filename, purpose or self.purpose, owner=self.owner
        )
        self.registry.record(record)
        return record

    def abort(self) -> None:
        if not self._out.closed:
            self._out.close()
        self.registry.store.delete(f"{self.id}.jsonl")


class FileRegistry:
    """The Files API's state: records in `client` under `prefix`, bytes in `store`."""

    def __init__(
        self,
        client: redis.Redis,
        store: FileStore,
        prefix: str = "harvest",
        max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    ) -> None:
        self.r = client
        self.store = store
        self.prefix = prefix
        self.max_file_bytes = max_file_bytes

    def _key(self, file_id: str) -> str:
        return f"{self.prefix}:file:{file_id}"

    def _index(self, tenant: str | None) -> str:
        """Every file by creation time (None: the operator's view), or one tenant's: a tenant's
        page reads only its own files however many others there are."""
        return f"{self.prefix}:files" if tenant is None else f"{self.prefix}:tenant:{tenant}:files"

    def start(self, filename: str, purpose: str = "batch", limited: bool = True, owner: str = "") -> Upload:
        """A new file of `owner`'s to write; `limited`: refuse it past `max_file_bytes` (uploads,
        not outputs)."""
        return Upload(self, filename, purpose, self.max_file_bytes if limited else None, owner)

    def record(self, record: FileRecord) -> None:
        with self.r.pipeline() as pipe:  # MULTI: a file is listed exactly when its record exists
            pipe.hset(self._key(record.id), mapping=asdict(record))
            now = time.time()
            pipe.zadd(self._index(None), {record.id: now})
            pipe.zadd(self._index(record.owner), {record.id: now})
            pipe.execute()

    def get(self, file_id: str, tenant: str | None = None) -> FileRecord | None:
        """The file, if `tenant` owns it (None: whoever does)."""
        h = self.r.hgetall(self._key(file_id))
        if not h or (tenant is not None and h.get("owner", "") != tenant):
            return None
        return FileRecord.from_hash(h)

    def list(
        self,
        purpose: str | None = None,
        limit: int = 10000,
        after: str | None = None,
        order: str = "desc",
        tenant: str | None = None,
    ) -> tuple[list[FileRecord], bool]:
        """A page of `tenant`'s files (newest first for `desc`) after the id `after`; and whether
        more follow. Reads `tenant`'s own index, a page's records in one round trip each."""
        index = self._index(tenant)
        start = 0
        if after is not None:  # another tenant's id is not in this index: an unknown cursor
            rank = self.r.zrevrank(index, after) if order == "desc" else self.r.zrank(index, after)
            if rank is None:
                return [], False
            start = rank + 1
        records: list[FileRecord] = []
        page = max(limit + 1, 100)
        while True:
            end = start + page - 1
            ids = self.r.zrevrange(index, start, end) if order == "desc" else self.r.zrange(index, start, end)
            if not ids:
                return records, False
            with self.r.pipeline(transaction=False) as pipe:
                for file_id in ids:
                    pipe.hgetall(self._key(file_id))
                hashes = pipe.execute()
            for h in hashes:
                if not h or (purpose is not None and h.get("purpose") != purpose):
                    continue
                if len(records) == limit:
                    return records, True
                records.append(FileRecord.from_hash(h))
            start += len(ids)

    def delete(self, file_id: str, tenant: str | None = None) -> bool:
        """Forget the file, then drop its bytes; False if `tenant` has no such file."""
        record = self.get(file_id, tenant)
        if record is None:
            return False
        with self.r.pipeline() as pipe:
            pipe.delete(self._key(file_id))
            pipe.zrem(self._index(None), file_id)
            pipe.zrem(self._index(record.owner), file_id)
            existed, *_ = pipe.execute()
        if existed:
            self.store.delete(f"{file_id}.jsonl")
        return bool(existed)
