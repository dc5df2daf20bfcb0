"""HarvestClient: submit offline jobs, watch them, fetch and export their results.

    client = HarvestClient()                       # $HARVEST_REDIS_URL, else redis://127.0.0.1:6390/0
    job = client.submit(["Summarise: ...", [{"role": "user", "content": "Hi"}]], max_tokens=64)
    client.wait(job.id)
    client.export(job.id, "out.parquet")

Errors: JobNotFoundError (unknown job id), InvalidInputError (bad lines, each with its
line number and reason), JobNotQueuedError (the job was cancelled while being submitted),
RedisUnavailableError (no Redis at the URL; shown with its password masked). A submit
that fails leaves nothing half-made: no job, or a failed one without shards.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import redis

from harvest.queue.config import JobOptions, default_redis_url
from harvest.queue.errors import RedisUnavailableError
from harvest.queue.inputs import read_items
from harvest.queue.models import Job
from harvest.queue.outputs import ResultRow, iter_results, to_table, write_batch_jsonl, write_parquet
from harvest.queue.store import JobStore, connect
from harvest.queue.submit import file_source, submit

_WINDOW = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_window(window: str | float | None) -> float | None:
    """A completion window: seconds, or OpenAI-style '24h' / '30m' / '90s' / '2d'."""
    if window is None or isinstance(window, int | float):
        return window
    m = _WINDOW.match(window)
    if m is None:
        raise ValueError(f"completion window must look like 24h, 30m or 90s, got {window!r}")
    return float(m.group(1)) * _UNIT_S[m.group(2)]


class HarvestClient:
    """The Python face of the job queue; see the module docstring."""

    def __init__(self, redis_url: str | None = None, prefix: str = "harvest") -> None:
        self.redis_url = redis_url or default_redis_url()
        self.store = JobStore(connect(self.redis_url), prefix)

    @contextlib.contextmanager
    def _reachable(self) -> Iterator[None]:
        try:
            yield
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise RedisUnavailableError(self.redis_url, exc) from exc

    def _options(
        self,
        model: str,
        name: str,
        max_tokens: int | None,
        temperature: float | None,
        defaults: dict[str, Any] | None,
        completion_window: str | float | None,
        **kwargs: Any,
    ) -> JobOptions:
        merged = dict(defaults or {})
        if max_tokens is not None:
            merged["max_tokens"] = max_tokens
        if temperature is not None:
            merged["temperature"] = temperature
        window = parse_window(completion_window)
        return JobOptions(name=name, model=model, defaults=merged, completion_window_s=window, **kwargs)

    def submit(
        self,
        requests: Iterable[Any],
        *,
        model: str = "",
        name: str = "",
        max_tokens: int | None = None,
        temperature: float | None = None,
        defaults: dict[str, Any] | None = None,
        completion_window: str | float | None = None,
        **options: Any,
    ) -> Job:
        """Queue prompt strings, chat-message lists or OpenAI batch request dicts.

        `options` are JobOptions fields: metadata, owner, shard_size, max_attempts,
        allow_invalid, dedup, group_by_prompt. Raises InvalidInputError (nothing queued) on
        bad items, and JobNotQueuedError when the job is cancelled before it was queued.
        """
        items = list(requests)  # validated and then written: two passes
        opts = self._options(model, name, max_tokens, temperature, defaults, completion_window, **options)
        with self._reachable():
            job_id = submit(self.store, lambda: read_items(items, opts.defaults), opts)
            return self.store.get_job(job_id)

    def submit_file(
        self,
        path: str | Path,
        *,
        column: str | None = None,
        template: str | None = None,
        id_column: str | None = None,
        chat: bool = False,
        model: str = "",
        name: str = "",
        max_tokens: int | None = None,
        temperature: float | None = None,
        defaults: dict[str, Any] | None = None,
        completion_window: str | float | None = None,
        **options: Any,
    ) -> Job:
        """Queue an OpenAI batch JSONL file, or a Parquet/CSV/JSONL table given `column`/`template`."""
        name = name or Path(path).name
        opts = self._options(model, name, max_tokens, temperature, defaults, completion_window, **options)
        source = file_source(path, opts.defaults, column, template, id_column, chat)
        with self._reachable():
            return self.store.get_job(submit(self.store, source, opts))

    def get(self, job_id: str) -> Job:
        with self._reachable():
            self.store.sweep()  # so a job past its deadline shows as expired even with no worker alive
            return self.store.get_job(job_id)

    def list_jobs(self, limit: int = 100) -> list[Job]:
        with self._reachable():
            self.store.sweep()
            return self.store.list_jobs(limit)

    def cancel(self, job_id: str) -> Job:
        """Stop a job; results finished so far are kept. It is `cancelled` once no shard is leased."""
        with self._reachable():
            self.store.cancel(job_id)
            return self.store.get_job(job_id)

    def wait(
        self, job_id: str, timeout: float | None = None, progress: bool = True, poll_s: float = 0.2
    ) -> Job:
        """Block until the job is completed, failed, expired or cancelled; TimeoutError after `timeout`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        bar = _ProgressBar(job_id) if progress else None
        try:
            while True:
                job = self.get(job_id)
                if bar is not None:
                    bar.update(job)
                if job.status.is_terminal:
                    return job
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(f"job {job_id} still {job.status.value} after {timeout}s")
                time.sleep(poll_s)
        finally:
            if bar is not None:
                bar.close()

    def iter_results(self, job_id: str) -> Iterator[ResultRow]:
        """Stream result rows in input order, one shard in memory at a time."""
        with self._reachable():
            yield from iter_results(self.store, job_id)

    def results(self, job_id: str) -> pa.Table:
        """All results as a pyarrow table (see harvest.queue.outputs.SCHEMA)."""
        return to_table(self.iter_results(job_id))

    def export(self, job_id: str, path: str | Path) -> Path:
        """Write results to .parquet, or OpenAI batch .jsonl (failures in NAME.errors.jsonl)."""
        path = Path(path)
        if path.suffix == ".parquet":
            write_parquet(self.iter_results(job_id), path)
        elif path.suffix == ".jsonl":
            model = self.get(job_id).model or "harvest"
            write_batch_jsonl(self.iter_results(job_id), path, model)
        else:
            raise ValueError(f"export to .parquet or .jsonl, got {path.name!r}")
        return path

    def purge(self, job_id: str, force: bool = False) -> int:
        """Delete a finished job and all its data now (they expire by themselves after the job
        TTL); how many keys went. A running job raises ValueError unless `force` (cancel first)."""
        with self._reachable():
            return self.store.purge(job_id, force)

    def dead_letters(self, job_id: str | None = None) -> list[tuple[str, int, str]]:
        with self._reachable():
            return self.store.dead_letters(job_id)


class _ProgressBar:
    """A rich progress bar over a job's finished requests."""

    def __init__(self, job_id: str) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            transient=False,
        )
        self.task = self.progress.add_task(job_id, total=None, status="")
        self.progress.start()

    def update(self, job: Job) -> None:
        counts = job.request_counts
        failed = f", {counts.failed} failed" if counts.failed else ""
        self.progress.update(
            self.task, total=counts.total or None, completed=counts.finished, status=job.status.value + failed
        )

    def close(self) -> None:
        self.progress.stop()
