"""BatchRegistry: OpenAI Batch objects, each one a harvest job.

`create` runs the same submission as `harvest submit` over the stored input file (one
translator, two passes, nothing half-made), checking besides that each line's `url` is
the batch's endpoint. The batch's own fields (input file, endpoint, window, output
files) live in the job's hash under `batch_*` names, so they expire and purge with the
job; `<prefix>:batches` lists the jobs made here, newest first.

Output and error files are written by the first read (GET, list) that finds the job
closed (completed, expired, cancelled), not by the worker that closes it: a job also
closes with no worker at all (a cancel with nothing leased, a sweep that expires it),
and the queue layer knows nothing of files. A claim key with a TTL makes the write
happen once across API replicas; until its files exist a closed batch reads as
`finalizing` (`cancelling` for a cancelled one), as OpenAI's does while it writes them.

A batch belongs to the tenant that created it (the job's `owner`): every verb takes the
caller's tenant, and another tenant's batch reads as no batch at all. `tenant=None` is the
operator's view of all (`harvest jobs`, HarvestClient).

At creation the batch gets an estimate (`x_harvest`): when it would finish at the fleet's
recent throughput behind the requests leased before or beside it, its own included
(`JobStore.eta`, by deadline class), its deadline, and whether the one passes the other.
Reading one batch (GET /v1/batches/{id}) recomputes it while the batch is in progress, from
the throughput and the work left now (two Redis round trips); a list shows the one stored at
creation. `eta` is null while nothing was written in the last minutes (no rate to judge by).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from harvest.batch.files import FileRecord, FileRegistry, Upload
from harvest.queue.config import JobOptions
from harvest.queue.errors import InvalidInputError
from harvest.queue.inputs import URLS, InputError, RequestSpec
from harvest.queue.models import Job, JobStatus
from harvest.queue.outputs import batch_jsonl_lines, iter_results
from harvest.queue.store import JobStore
from harvest.queue.submit import Source, file_source, submit

CLOSED = (JobStatus.COMPLETED, JobStatus.EXPIRED, JobStatus.CANCELLED)  # these get output files
WRITING_STATUS = {
    JobStatus.COMPLETED: "finalizing",
    JobStatus.EXPIRED: "finalizing",
    JobStatus.CANCELLED: "cancelling",
}
WRITE_CLAIM_S = 600  # a writer that died holding the claim is replaced after this long
MISMATCHED = "does not match the batch's endpoint"


class BatchInputError(ValueError):
    """The batch cannot be created at all (no job is made): names the offending parameter."""

    def __init__(self, message: str, param: str, not_found: bool = False) -> None:
        super().__init__(message)
        self.param = param
        self.not_found = not_found


@dataclass
class BatchView:
    """A job read as an OpenAI Batch object (`to_openai`)."""

    job: Job
    fields: dict[str, str]  # the job hash's batch_* fields, prefix stripped
    files_pending: bool

    @property
    def estimate(self) -> dict[str, Any]:
        """The `x_harvest` extension field: a client that does not know it ignores it."""
        eta = self.fields.get("eta")
        return {
            "eta": int(float(eta)) if eta else None,
            "deadline": _ts(self.job.expires_at),
            "at_risk": self.fields.get("at_risk") == "1",
        }

    def to_openai(self) -> dict[str, Any]:
        job, f = self.job, self.fields
        counts = job.request_counts
        total, completed, failed = counts.total, counts.completed, counts.failed
        if "output_completed" in f:  # closed: the files' line counts, unfinished requests as failed
            completed, failed = int(f["output_completed"]), int(f["output_failed"])
        status = WRITING_STATUS[job.status] if self.files_pending else job.status.value
        errors = None
        if job.status is JobStatus.FAILED:
            errors = {"object": "list", "data": [_batch_error(e) for e in job.errors]}
        return {
            "id": job.id,
            "object": "batch",
            "endpoint": f["endpoint"],
            "errors": errors,
            "input_file_id": f["input_file_id"],
            "completion_window": f["completion_window"],
            "status": status,
            "output_file_id": f.get("output_file_id") or None,
            "error_file_id": f.get("error_file_id") or None,
            "created_at": _ts(job.created_at),
            "in_progress_at": _ts(job.in_progress_at),
            "expires_at": _ts(job.expires_at),
            "finalizing_at": _ts(job.finalizing_at),
            "completed_at": _ts(job.completed_at),
            "failed_at": _ts(job.failed_at),
            "expired_at": _ts(job.expired_at),
            "cancelling_at": _ts(job.cancelling_at),
            "cancelled_at": _ts(job.cancelled_at),
            "request_counts": {"total": total, "completed": completed, "failed": failed},
            "metadata": job.metadata or None,
            "model": job.model or None,
            "x_harvest": self.estimate,
        }


def _ts(seconds: float | None) -> int | None:
    return int(seconds) if seconds is not None else None


def _batch_error(error: dict[str, Any]) -> dict[str, Any]:
    """A stored validation error (InputError.to_dict) as OpenAI's BatchError."""
    message = error.get("message", "")
    if message.startswith("malformed JSON"):
        code, param = "invalid_json_line", None
    elif MISMATCHED in message:
        code, param = "mismatched_endpoint", "url"
    elif message.startswith("duplicate custom_id") or message.startswith("custom_id"):
        code, param = "invalid_custom_id", "custom_id"
    elif error.get("line", 0) == 0:
        code, param = "invalid_file", "input_file_id"
    else:
        code, param = "invalid_request", None
    return {"code": code, "line": error.get("line") or None, "message": message, "param": param}


def for_endpoint(source: Source, endpoint: str) -> Source:
    """`source` with every request whose url is not `endpoint` turned into that line's error."""

    def items() -> Iterator[tuple[int, RequestSpec | InputError]]:
        for line, item in source():
            if isinstance(item, RequestSpec) and item.url != endpoint:
                why = f"url {item.url!r} {MISMATCHED} {endpoint!r}"
                item = InputError(line, why, item.custom_id)
            yield line, item

    return items


class BatchRegistry:
    """The Batches API's verbs over a JobStore and the FileRegistry holding their files."""

    def __init__(self, store: JobStore, files: FileRegistry) -> None:
        self.store = store
        self.files = files
        self.index = f"{store.prefix}:batches"  # every tenant's, for the operator's view

    def _index(self, tenant: str | None) -> str:
        return self.index if tenant is None else f"{self.store.prefix}:tenant:{tenant}:batches"

    def create(
        self,
        input_file_id: str,
        endpoint: str,
        completion_window: str,
        window_s: float,
        metadata: dict[str, str] | None,
        model: str,
        tenant: str = "",
    ) -> BatchView:
        """Validate and queue the file's requests as `tenant`'s job (blocking: call it from a
        thread). A file with bad lines gives a `failed` batch naming them; BatchInputError when
        there is nothing to make a batch of."""
        if endpoint not in URLS:
            raise BatchInputError(f"endpoint must be one of {', '.join(URLS)}, got {endpoint!r}", "endpoint")
        record = self.files.get(input_file_id, tenant)
        if record is None:
            raise BatchInputError(f"No such File object: {input_file_id}", "input_file_id", not_found=True)
        if record.purpose != "batch":
            raise BatchInputError(
                f"File {input_file_id} has purpose {record.purpose!r}, not 'batch'", "input_file_id"
            )
        options = JobOptions(
            name=record.filename,
            model=model,
            metadata=metadata or {},
            completion_window_s=window_s,
            owner=tenant,
        )
        with self.files.store.local_path(record.key) as path:
            source = for_endpoint(file_source(path, {}), endpoint)
            try:
                job_id = submit(self.store, source, options)
            except InvalidInputError as exc:
                if exc.job_id is None:
                    raise BatchInputError(str(exc), "input_file_id") from None
                job_id = exc.job_id  # failed, with its errors on the record
        fields = {
            "batch_input_file_id": input_file_id,
            "batch_endpoint": endpoint,
            "batch_completion_window": completion_window,
            **self._estimate(job_id),
        }
        self.store.r.hset(self.store.job_key(job_id), mapping=fields)
        with self.store.r.pipeline() as pipe:
            now = time.time()
            pipe.zadd(self.index, {job_id: now})
            pipe.zadd(self._index(tenant), {job_id: now})
            pipe.execute()
        view = self.get(job_id, tenant)
        assert view is not None
        return view

    def _estimate(self, job_id: str) -> dict[str, Any]:
        """batch_eta / batch_at_risk for a job just queued (nothing for one that failed)."""
        return {f"batch_{k}": v for k, v in self._eta(self.store.get_job(job_id)).items()}

    def _eta(self, job: Job) -> dict[str, Any]:
        """eta / at_risk of an in-progress job as the fleet runs now; {} for any other job or
        with no recent throughput."""
        if job.status is not JobStatus.IN_PROGRESS or job.expires_at is None:
            return {}
        if (eta := self.store.eta(job.expires_at)) is None:
            return {}
        return {"eta": round(eta, 3), "at_risk": int(eta > job.expires_at)}

    def get(
        self, batch_id: str, tenant: str | None = None, sweep: bool = True, fresh_eta: bool = False
    ) -> BatchView | None:
        """The batch, its files written if it just closed; None if `tenant` has no batch of this
        id (None: any tenant's). `fresh_eta`: recompute the estimate of a batch in progress."""
        if sweep:  # so that a batch past its window reads as expired with no worker alive
            self.store.sweep()
        h = self.store.r.hgetall(self.store.job_key(batch_id))
        if "batch_endpoint" not in h or (tenant is not None and h.get("owner", "") != tenant):
            return None
        job = Job.from_hash(h)
        if job.status in CLOSED and "batch_files" not in h and self._write_files(job):
            h = self.store.r.hgetall(self.store.job_key(batch_id))
        fields = {k.removeprefix("batch_"): v for k, v in h.items() if k.startswith("batch_")}
        if fresh_eta and job.status is JobStatus.IN_PROGRESS:
            fields.pop("eta", None)  # no throughput now: no eta, as at creation
            fields.pop("at_risk", None)
            fields.update({k: str(v) for k, v in self._eta(job).items()})
        return BatchView(job, fields, job.status in CLOSED and "files" not in fields)

    def list(
        self, limit: int = 20, after: str | None = None, tenant: str | None = None
    ) -> tuple[list[BatchView], bool]:
        """A page of `tenant`'s batches, newest first, after the id `after`; and whether more follow.
        Walks `tenant`'s own index (None: every tenant's); an id whose job expired is dropped
        from the index as the walk meets it."""
        index = self._index(tenant)
        start = 0
        if after is not None:  # another tenant's id is not in this index: an unknown cursor
            rank = self.store.r.zrevrank(index, after)
            if rank is None:
                return [], False
            start = rank + 1
        self.store.sweep()
        views: list[BatchView] = []
        for batch_id in self.store.r.zrevrange(index, start, -1):
            view = self.get(batch_id, sweep=False)
            if view is None:  # its job expired (job TTL) or was purged
                self.store.r.zrem(index, batch_id)
                if index != self.index:
                    self.store.r.zrem(self.index, batch_id)
                continue
            if len(views) == limit:
                return views, True
            views.append(view)
        return views, False

    def cancel(self, batch_id: str, tenant: str | None = None) -> BatchView | None:
        if self.get(batch_id, tenant, sweep=False) is None:
            return None
        self.store.cancel(batch_id)
        return self.get(batch_id, tenant)

    def _write_files(self, job: Job) -> bool:
        """Write the closed job's output and error files once; False if another reader holds the
        claim (its files are on their way)."""
        key = self.store.job_key(job.id)
        claim = uuid.uuid4().hex
        if not self.store.r.set(f"{key}:batch_writing", claim, nx=True, ex=WRITE_CLAIM_S):
            return False
        uploads: dict[bool, Upload] = {}
        counts = {True: 0, False: 0}
        try:
            for ok, line in batch_jsonl_lines(iter_results(self.store, job.id), job.model or "harvest"):
                if ok not in uploads:
                    name = f"{job.id}_{'output' if ok else 'error'}.jsonl"
                    uploads[ok] = self.files.start(name, "batch_output", limited=False, owner=job.owner)
                uploads[ok].write(line)
                counts[ok] += 1
            records: dict[bool, FileRecord] = {ok: upload.commit() for ok, upload in uploads.items()}
        except BaseException:
            for upload in uploads.values():
                upload.abort()
            self.store.r.delete(f"{key}:batch_writing")
            raise
        self.store.r.hset(
            key,
            mapping={
                "batch_output_file_id": records[True].id if True in records else "",
                "batch_error_file_id": records[False].id if False in records else "",
                "batch_output_completed": counts[True],
                "batch_output_failed": counts[False],
                "batch_files": 1,
            },
        )
        self.store.r.delete(f"{key}:batch_writing")  # batch_files now says it is done
        return True
