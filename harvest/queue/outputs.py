"""Job results out: streaming rows, a pyarrow table / Parquet file, OpenAI batch JSONL.

Rows come in input order. Shards hold requests in input order unless the job was placed by
prompt (queue/placement.py): rows that arrive in input order pass straight through, and
from the first that does not, the rest wait in a temporary file until their turn (each
stored request's `pos` says its place). Either way an export holds one shard in memory
at a time, plus an offset per request when it spools. Requests of a cancelled or expired
job that never finished get an error row (`batch_cancelled` / `batch_expired`), so every
request appears exactly once.
"""

from __future__ import annotations

import json
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from harvest.queue.inputs import CHAT
from harvest.queue.models import JobStatus, Result
from harvest.queue.spool import Spool
from harvest.queue.store import JobStore

SCHEMA = pa.schema(
    [
        ("custom_id", pa.string()),
        ("url", pa.string()),
        ("prompt", pa.string()),
        ("output", pa.string()),
        ("status", pa.string()),
        ("finish_reason", pa.string()),
        ("prompt_tokens", pa.int32()),
        ("completion_tokens", pa.int32()),
        ("resumed_tokens", pa.int32()),
        ("output_token_ids", pa.list_(pa.int32())),
        ("started_at", pa.float64()),
        ("finished_at", pa.float64()),
        ("ttft_s", pa.float64()),
        ("latency_s", pa.float64()),
        ("device_seconds", pa.float64()),
        ("worker", pa.string()),
        ("attempt", pa.int32()),
        ("error_code", pa.string()),
        ("error_message", pa.string()),
        ("deduplicated", pa.bool_()),
    ]
)
CLOSED_ERRORS = {JobStatus.CANCELLED: "batch_cancelled", JobStatus.EXPIRED: "batch_expired"}


@dataclass
class ResultRow:
    custom_id: str
    url: str
    prompt: str  # chat messages and token-id prompts as JSON
    result: Result

    def to_record(self) -> dict[str, Any]:
        r = self.result
        return {
            "custom_id": self.custom_id,
            "url": self.url,
            "prompt": self.prompt,
            "output": r.text,
            "status": r.status,
            "finish_reason": r.finish_reason,
            "prompt_tokens": r.prompt_tokens,
            "completion_tokens": r.completion_tokens,
            "resumed_tokens": r.resumed_tokens,
            "output_token_ids": r.token_ids,
            "started_at": r.started_at,
            "finished_at": r.finished_at,
            "ttft_s": r.ttft_s,
            "latency_s": r.latency_s,
            "device_seconds": r.device_seconds,
            "worker": r.worker,
            "attempt": r.attempt,
            "error_code": r.error_code,
            "error_message": r.error_message,
            "deduplicated": r.deduplicated,
        }


def _prompt_text(payload: dict[str, Any]) -> str:
    if payload["url"] == CHAT:
        return json.dumps(payload["messages"])
    prompt = payload.get("prompt")
    return prompt if isinstance(prompt, str) else json.dumps(prompt)


def iter_results(store: JobStore, job_id: str) -> Iterator[ResultRow]:
    """One row per finished request, in input order; for a closed job, one per request."""
    job = store.get_job(job_id)
    closed_code = CLOSED_ERRORS.get(job.status)
    expected = 0  # the next position in input order
    spool: Spool | None = None
    spooled = array("q", [-1]) * job.request_counts.total  # position -> spool record (-1: no row)
    try:
        for _, requests, results in store.iter_shards(job_id):
            for index, payload in enumerate(requests):
                result = results.get(index)
                if result is None and closed_code is not None:
                    message = f"the job was {job.status.value} before this request finished"
                    result = Result.error(closed_code, message)
                pos = payload.get("pos", expected)  # none: stored before placement, in input order
                if spool is None and pos == expected:
                    expected += 1
                    if result is not None:
                        yield _row(payload, result)
                    continue
                spool = spool or Spool()
                if result is not None:
                    spooled[pos] = spool.append(orjson.dumps([payload, vars(result)]))
        for pos in range(expected, len(spooled) if spool is not None else 0):
            if spooled[pos] >= 0:
                payload, result = orjson.loads(spool[spooled[pos]])
                yield _row(payload, Result(**result))
    finally:
        if spool is not None:
            spool.close()


def _row(payload: dict[str, Any], result: Result) -> ResultRow:
    return ResultRow(payload["custom_id"], payload["url"], _prompt_text(payload), result)


def _batches(rows: Iterable[ResultRow], size: int) -> Iterator[pa.RecordBatch]:
    chunk: list[dict[str, Any]] = []
    for row in rows:
        chunk.append(row.to_record())
        if len(chunk) == size:
            yield pa.RecordBatch.from_pylist(chunk, schema=SCHEMA)
            chunk = []
    if chunk:
        yield pa.RecordBatch.from_pylist(chunk, schema=SCHEMA)


def to_table(rows: Iterable[ResultRow]) -> pa.Table:
    return pa.Table.from_batches(list(_batches(rows, 4096)), schema=SCHEMA)


def write_parquet(rows: Iterable[ResultRow], path: Path, batch_rows: int = 4096) -> int:
    """Stream rows into a Parquet file; returns the row count."""
    n = 0
    with pq.ParquetWriter(path, SCHEMA) as writer:
        for batch in _batches(rows, batch_rows):
            writer.write_batch(batch)
            n += batch.num_rows
    return n


def batch_output_line(row: ResultRow, model: str) -> dict[str, Any]:
    """One line of an OpenAI Batch output (completed) or error file."""
    r = row.result
    line_id = f"batch_req_{row.custom_id}"
    if not r.ok:
        return {
            "id": line_id,
            "custom_id": row.custom_id,
            "response": None,
            "error": {"code": r.error_code, "message": r.error_message},
        }
    usage = {
        "prompt_tokens": r.prompt_tokens,
        "completion_tokens": r.completion_tokens,
        "total_tokens": r.prompt_tokens + r.completion_tokens,
    }
    # the fields the online routes answer with (harvest/api/schemas.py), in their order
    if row.url == CHAT:
        message = {"role": "assistant", "content": r.text, "refusal": None}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": r.finish_reason}
        body = {"id": f"chatcmpl-{row.custom_id}", "object": "chat.completion"}
    else:
        choice = {"index": 0, "text": r.text, "logprobs": None, "finish_reason": r.finish_reason}
        body = {"id": f"cmpl-{row.custom_id}", "object": "text_completion"}
    body = {
        **body,
        "created": int(r.finished_at or 0),
        "model": model,
        "choices": [choice],
        "usage": usage,
        "system_fingerprint": None,
        "service_tier": "flex",  # it ran in the offline class, on harvested capacity, as flex does
    }
    if r.deduplicated:  # harvest's own extension, only where it says something
        body["x_harvest"] = {"deduplicated": True}
    response = {"status_code": 200, "request_id": line_id, "body": body}
    return {"id": line_id, "custom_id": row.custom_id, "response": response, "error": None}


def errors_path_for(path: Path) -> Path:
    """out.jsonl -> out.errors.jsonl"""
    return path.with_name(f"{path.stem}.errors{path.suffix}")


def batch_jsonl_lines(rows: Iterable[ResultRow], model: str) -> Iterator[tuple[bool, bytes]]:
    """(completed?, one encoded line) per row: completed ones belong in the output file, the
    rest in the error file. One encoder for `harvest export` and the Batch API's files."""
    for row in rows:
        yield row.result.ok, json.dumps(batch_output_line(row, model)).encode() + b"\n"


def write_batch_jsonl(rows: Iterable[ResultRow], path: Path, model: str) -> tuple[int, int]:
    """OpenAI batch output JSONL at `path`, failed requests in errors_path_for(path).

    The error file is written only when some request failed. Returns (completed, failed).
    """
    counts = [0, 0]
    errors_path = errors_path_for(path)
    errors_file = None
    try:
        with open(path, "wb") as out:
            for ok, line in batch_jsonl_lines(rows, model):
                if ok:
                    out.write(line)
                    counts[0] += 1
                else:
                    if errors_file is None:
                        errors_file = open(errors_path, "wb")  # noqa: SIM115  (opened on first error)
                    errors_file.write(line)
                    counts[1] += 1
    finally:
        if errors_file is not None:
            errors_file.close()
    if errors_file is None and errors_path.exists():
        errors_path.unlink()  # stale file from an earlier export
    return counts[0], counts[1]
