"""Submitting a job: validate every line first, then stream valid requests into shards.

Two passes over the source keep memory flat for large inputs: the first validates and
collects errors (plus the set of custom_ids, for duplicates) and what placing each valid
request needs (placement.py); the second writes shards of at most `shard_size` requests.
When placement keeps input order (nothing shared) the second pass streams into shards as
it reads; otherwise it spools the requests to a temporary file and the shards are read
back from it in the placed order. Each stored request carries `pos`, its place among the
valid ones in input order, by which results come back in input order (outputs.py).
Nothing becomes leasable until `activate`.

A submission ends one of four ways, never half-made: queued; nothing created at all (the
input as a whole is judged before a job exists: file, suffix, template, columns); the job
`failed` with its errors and the shards written for it dropped (bad lines, an input error
found while reading, an interruption); or the job cancelled or failed by someone else
meanwhile (JobNotQueuedError), its shards dropped by whoever ended it. A submitter that
dies where it cannot tell Redis (Redis itself gone) leaves a `validating` job that the
first sweep after `submitter_timeout_s` fails the same way.
"""

from __future__ import annotations

import csv
import itertools
import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from harvest.queue.config import JobOptions
from harvest.queue.errors import InvalidInputError, JobNotQueuedError
from harvest.queue.inputs import BadRequest, InputError, RequestSpec, read_batch_jsonl, sampling_from
from harvest.queue.models import JobStatus
from harvest.queue.placement import Placement
from harvest.queue.spool import Spool
from harvest.queue.store import JobStore
from harvest.queue.tables import read_table, table_format, template_fields

log = logging.getLogger(__name__)

Source = Callable[[], Iterator[tuple[int, RequestSpec | InputError]]]  # callable twice: two passes
MAX_REPORTED_ERRORS = 1000  # kept on the job record; the count covers all of them
SHARDS_PER_WRITE = 16
T = TypeVar("T")


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


def validate(source: Source, keep: Callable[[RequestSpec], None] | None = None) -> Validation:
    """Count and collect the source's errors; `keep` sees each valid request, in input order."""
    v = Validation()
    for _, item in without_duplicates(source()):
        if isinstance(item, InputError):
            v.num_errors += 1
            if len(v.errors) < MAX_REPORTED_ERRORS:
                v.errors.append(item)
        else:
            v.num_valid += 1
            if keep is not None:
                keep(item)
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
    check_table(path, column, template, id_column)
    return lambda: read_table(path, column, template, defaults, id_column, chat)


def check_table(path: Path, column: str | None, template: str | None, id_column: str | None) -> None:
    """What can be judged of a table as a whole, judged before a job exists: its type, the
    template's syntax and (Parquet, CSV) that the columns exist. InvalidInputError if not."""
    fmt = table_format(path)
    fields = template_fields(template) if template is not None else []
    needed = list(dict.fromkeys(c for c in (column, *fields, id_column) if c))
    try:
        if fmt == "parquet":
            names = pq.read_schema(path).names
        elif fmt == "csv":
            names = _csv_header(path)
        else:
            return  # JSONL rows each have their own keys: a missing one is that row's error
    except (pa.ArrowException, OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InvalidInputError([InputError(0, f"cannot read {path.name} as {fmt}: {exc}")]) from None
    missing = [c for c in needed if c not in names]
    if missing:
        raise InvalidInputError([InputError(0, f"no column(s) {missing} in {path.name}; it has {names}")])


def _csv_header(path: Path) -> list[str]:
    """The header row alone: a bad row further down is that row's error, named when it is read."""
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    with open(path, "rb") as f:  # bytes: a text file decodes a whole buffer, rows below included
        header = f.readline().decode("utf-8-sig")
    return next(csv.reader([header], delimiter=delimiter), [])


def submit(store: JobStore, source: Source, options: JobOptions) -> str:
    """Validate, create, shard and activate a job; returns its id once it is queued.

    InvalidInputError when the input is rejected (with `job_id` when a failed job records
    why), JobNotQueuedError when the job was cancelled or failed during submission; any
    other exception leaves the job failed. See the module docstring.
    """
    try:
        sampling_from({}, options.defaults)
    except BadRequest as exc:
        raise InvalidInputError([InputError(0, f"job sampling defaults: {exc}")]) from None
    job_id = store.create_job(options)
    try:
        _fill(store, job_id, _with_heartbeat(store, job_id, source), options)
        status = store.activate(job_id)
    except InvalidInputError as exc:  # bad lines, or the input as a whole found bad while reading it
        exc.job_id = job_id
        _give_up(store, job_id, exc.errors, exc.num_errors)
        raise
    except JobNotQueuedError:
        raise  # whoever cancelled or failed the job dropped its shards
    except BaseException as exc:  # Redis gone mid-write, a bug, Ctrl-C: nothing half-made either way
        _give_up(store, job_id, [InputError(0, f"submission interrupted: {exc!r}")], 1)
        raise
    if status in (JobStatus.FAILED, JobStatus.CANCELLED):  # e.g. cancelled after the last shard
        raise _not_queued(store, job_id, status.value)
    return job_id


def _fill(store: JobStore, job_id: str, source: Source, options: JobOptions) -> None:
    """Validate the source and write its valid requests as shards; InvalidInputError to reject."""
    placement = Placement(options.shard_size, options.group_by_prompt, options.dedup)
    v = validate(source, placement.add)
    if v.num_valid == 0 and v.num_errors == 0:
        v.errors.append(InputError(0, "the input holds no requests"))
        v.num_errors = 1
    if (v.num_errors and not options.allow_invalid) or v.num_valid == 0:
        raise InvalidInputError(v.errors, v.num_errors)
    if v.num_errors:
        errors = json.dumps([e.to_dict() for e in v.errors])
        store.r.hset(store.job_key(job_id), mapping={"errors": errors, "num_errors": v.num_errors})
    plan = list(placement.shards())
    payloads = _payloads(source, options.dedup)
    if all(pos == i for i, pos in enumerate(itertools.chain.from_iterable(plan))):  # input order
        _write_shards(store, job_id, _cut(payloads, (len(shard) for shard in plan)))
        return
    with Spool() as spool:
        for payload in payloads:
            spool.append(orjson.dumps(payload))
        shards = ([orjson.loads(spool[pos]) for pos in shard] for shard in plan)
        _write_shards(store, job_id, _heartbeat(store, job_id, shards))


def _payloads(source: Source, dedup: bool) -> Iterator[dict[str, Any]]:
    """The valid requests as stored, in input order (the second pass)."""
    pos = 0
    for _, item in without_duplicates(source()):
        if isinstance(item, RequestSpec):
            payload = {**item.to_payload(), "pos": pos}
            if not dedup:  # the worker reads it per request: a lease carries payloads, not job options
                payload["dedup"] = False
            yield payload
            pos += 1


def _cut(payloads: Iterator[dict[str, Any]], sizes: Iterator[int]) -> Iterator[list[dict[str, Any]]]:
    shard: list[dict[str, Any]] = []
    size = next(sizes, 0)
    for payload in payloads:
        shard.append(payload)
        if len(shard) == size:
            yield shard
            shard, size = [], next(sizes, 0)
    if shard:
        yield shard


def _give_up(store: JobStore, job_id: str, errors: list[InputError], num_errors: int) -> None:
    """Fail the job with `errors` and drop its shards. With Redis unreachable that is left to the
    sweep (after `submitter_timeout_s`), so the caller still sees the exception that stopped it."""
    try:
        store.reject(job_id, [e.to_dict() for e in errors], num_errors)
    except Exception as exc:  # never in place of the exception that stopped the submission
        log.warning("job %s not marked failed (%r); a sweep will fail it and drop its shards", job_id, exc)


def _not_queued(store: JobStore, job_id: str, status: str) -> JobNotQueuedError:
    reason = ""
    if status == JobStatus.FAILED.value:  # a sweep took the submitter for dead
        errors = store.get_job(job_id).errors
        reason = errors[0]["message"] if errors else ""
    return JobNotQueuedError(job_id, status, reason)


def _with_heartbeat(store: JobStore, job_id: str, source: Source) -> Source:
    return lambda: _heartbeat(store, job_id, source())


def _heartbeat(store: JobStore, job_id: str, items: Iterable[T]) -> Iterator[T]:
    """`items`, telling Redis now and then that their submitter is alive (see `still_validating`);
    JobNotQueuedError as soon as the job is no longer validating (cancelled, or failed by a sweep)."""
    every_s = store.submitter_timeout_ms / 1000 / 4
    last = time.monotonic()
    for item in items:
        if time.monotonic() - last > every_s:
            status = store.still_validating(job_id)
            if status != JobStatus.VALIDATING.value:
                raise _not_queued(store, job_id, status)
            last = time.monotonic()
        yield item


def _write_shards(store: JobStore, job_id: str, shards: Iterable[list[dict[str, Any]]]) -> None:
    batch: list[list[dict[str, Any]]] = []
    written = 0
    for shard in shards:
        batch.append(shard)
        if len(batch) == SHARDS_PER_WRITE:
            _add_shards(store, job_id, batch, written)
            written += len(batch)
            batch = []
    if batch:
        _add_shards(store, job_id, batch, written)


def _add_shards(store: JobStore, job_id: str, shards: list[list[dict[str, Any]]], first: int) -> None:
    reply = store.add_shards(job_id, shards, first=first)
    if reply != "ok":  # cancelled or failed meanwhile: nothing was written, and no more will be
        raise _not_queued(store, job_id, reply)
