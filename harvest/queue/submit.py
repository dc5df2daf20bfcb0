"""Submitting a job: validate every line first, then stream valid requests into shards.

Two passes over the source keep memory flat for large inputs: the first validates and
collects errors (plus the set of custom_ids, for duplicates), the second writes shards of
`shard_size` requests. Nothing becomes leasable until `activate`, so a rejected input
never leaves a half-queued job.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harvest.queue.config import JobOptions
from harvest.queue.errors import InvalidInputError
from harvest.queue.inputs import BadRequest, InputError, RequestSpec, read_batch_jsonl, sampling_from
from harvest.queue.store import JobStore
from harvest.queue.tables import read_table

Source = Callable[[], Iterator[tuple[int, RequestSpec | InputError]]]  # callable twice: two passes
MAX_REPORTED_ERRORS = 1000  # kept on the job record; the count covers all of them
SHARDS_PER_WRITE = 16


@dataclass
class Validation:
    num_valid: int = 0
    num_errors: int = 0
    errors: list[InputError] = field(default_factory=list)  # the first MAX_REPORTED_ERRORS


def without_duplicates(pairs: Iterator[tuple[int, RequestSpec | InputError]]):
    """The second and later uses of a custom_id become errors (the first one stays valid)."""
    seen: dict[str, int] = {}
    for line, item in pairs:
        if isinstance(item, RequestSpec):
            if item.custom_id in seen:
                first = seen[item.custom_id]
                item = InputError(
                    line, f"duplicate custom_id {item.custom_id!r} (first at {first})", item.custom_id
                )
            else:
                seen[item.custom_id] = line
        yield line, item


def validate(source: Source) -> Validation:
    v = Validation()
    for _, item in without_duplicates(source()):
        if isinstance(item, InputError):
            v.num_errors += 1
            if len(v.errors) < MAX_REPORTED_ERRORS:
                v.errors.append(item)
        else:
            v.num_valid += 1
    return v


def file_source(
    path: str | Path,
    defaults: dict[str, Any],
    column: str | None = None,
    template: str | None = None,
    id_column: str | None = None,
    chat: bool = False,
) -> Source:
    """OpenAI Batch JSONL, or a table (Parquet/CSV/JSONL) when a column or template is given."""
    path = Path(path)
    if not path.is_file():
        raise InvalidInputError([InputError(0, f"no such file: {path}")])
    if column is None and template is None:
        if path.suffix.lower() not in (".jsonl", ".ndjson", ".json"):
            raise InvalidInputError([InputError(0, f"{path.name}: a table needs --column (or --template)")])
        return lambda: read_batch_jsonl(path, defaults)
    return lambda: read_table(path, column, template, defaults, id_column, chat)


def submit(store: JobStore, source: Source, options: JobOptions) -> str:
    """Validate, create, shard and activate a job; InvalidInputError when it is rejected."""
    try:
        sampling_from({}, options.defaults)
    except BadRequest as exc:
        raise InvalidInputError([InputError(0, f"job sampling defaults: {exc}")]) from None
    job_id = store.create_job(options)
    source = _with_heartbeat(store, job_id, source)
    try:
        v = validate(source)
        if v.num_valid == 0 and v.num_errors == 0:
            v.errors.append(InputError(0, "the input holds no requests"))
            v.num_errors = 1
        if (v.num_errors and not options.allow_invalid) or v.num_valid == 0:
            store.reject(job_id, [e.to_dict() for e in v.errors], v.num_errors)
            raise InvalidInputError(v.errors, v.num_errors, job_id)
        if v.num_errors:
            errors = json.dumps([e.to_dict() for e in v.errors])
            store.r.hset(store.job_key(job_id), mapping={"errors": errors, "num_errors": v.num_errors})
        _write_shards(store, job_id, source, options.shard_size)
    except InvalidInputError:
        raise
    except BaseException as exc:
        store.reject(job_id, [InputError(0, f"submission interrupted: {exc!r}").to_dict()], 1)
        raise
    store.activate(job_id)
    return job_id


def _with_heartbeat(store: JobStore, job_id: str, source: Source) -> Source:
    """The source, telling Redis now and then that its submitter is alive (see `still_validating`)."""
    every_s = store.submitter_timeout_ms / 1000 / 4

    def items() -> Iterator[tuple[int, RequestSpec | InputError]]:
        last = time.monotonic()
        for item in source():
            if time.monotonic() - last > every_s:
                store.still_validating(job_id)
                last = time.monotonic()
            yield item

    return items


def _write_shards(store: JobStore, job_id: str, source: Source, shard_size: int) -> None:
    shards: list[list[dict[str, Any]]] = []
    current: list[dict[str, Any]] = []
    written = 0
    for _, item in without_duplicates(source()):
        if isinstance(item, InputError):
            continue
        current.append(item.to_payload())
        if len(current) == shard_size:
            shards.append(current)
            current = []
        if len(shards) == SHARDS_PER_WRITE:
            store.add_shards(job_id, shards, first=written)
            written += len(shards)
            shards = []
    if current:
        shards.append(current)
    if shards:
        store.add_shards(job_id, shards, first=written)
