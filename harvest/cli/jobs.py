"""Offline job commands: `harvest submit|jobs|status|results|cancel|work`.

Scripts can rely on the exit codes (also listed in each command's help) and on `submit`
printing only the job id on stdout; everything for humans goes to stderr.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import redis
import typer
from rich.console import Console
from rich.table import Column, Table

from harvest.cli.app import app
from harvest.cli.exits import (
    EXIT_BAD_INPUT,
    EXIT_CODES,
    EXIT_ERROR,
    EXIT_NOT_COMPLETED,
    EXIT_NOT_FOUND,
    EXIT_REDIS,
    EXIT_TIMEOUT,
    EXIT_USAGE,
)
from harvest.queue.config import default_redis_url
from harvest.queue.errors import (
    InvalidInputError,
    JobNotFoundError,
    JobNotQueuedError,
    QueueError,
    RedisUnavailableError,
)
from harvest.queue.models import Job, JobStatus
from harvest.queue.redis_checks import RedisConfigError
from harvest.redact import redact_url

err = Console(stderr=True)
out = Console()
RedisUrl = typer.Option(
    None, "--redis-url", help="Default: $HARVEST_REDIS_URL, else the embedded redis://127.0.0.1:6390/0."
)


@contextlib.contextmanager
def _exits() -> Iterator[None]:
    """Turn the queue's exceptions into a message and a documented exit code."""
    try:
        yield
    except InvalidInputError as exc:
        err.print(
            f"[red]rejected:[/] {exc}" + (f"\n(job {exc.job_id} recorded as failed)" if exc.job_id else "")
        )
        raise typer.Exit(EXIT_BAD_INPUT) from None
    except JobNotFoundError as exc:
        err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(EXIT_NOT_FOUND) from None
    except JobNotQueuedError as exc:
        err.print(f"[yellow]not queued:[/] {exc}")
        raise typer.Exit(EXIT_NOT_COMPLETED) from None
    except RedisConfigError as exc:
        err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(EXIT_REDIS) from None
    except (RedisUnavailableError, redis.ConnectionError) as exc:
        err.print(f"[red]error:[/] {exc}\nStart Redis (`harvest up`) or set HARVEST_REDIS_URL.")
        raise typer.Exit(EXIT_REDIS) from None
    except TimeoutError as exc:
        err.print(f"[yellow]timeout:[/] {exc}")
        raise typer.Exit(EXIT_TIMEOUT) from None


def _client(redis_url: str | None):
    from harvest.client import HarvestClient

    return HarvestClient(redis_url or default_redis_url())


def _finish(job: Job) -> None:
    counts = job.request_counts
    colour = "green" if job.status is JobStatus.COMPLETED else "yellow"
    err.print(
        f"[{colour}]{job.id} {job.status.value}[/]: {counts.completed} completed, {counts.failed} failed"
    )
    if job.status is not JobStatus.COMPLETED:
        raise typer.Exit(EXIT_NOT_COMPLETED)


@app.command(epilog=EXIT_CODES)
def submit(
    file: Path | None = typer.Argument(
        None,
        help="OpenAI batch JSONL, or a Parquet/CSV/JSONL table with --column (with --workload: its dataset).",
    ),
    workload: str | None = typer.Option(
        None,
        "--workload",
        help="Build requests with a workload kind: summarize, mc_eval, classify, synthetic.",
    ),
    option: list[str] = typer.Option([], "--option", help="Workload option key=value (repeatable)."),
    column: str | None = typer.Option(None, "--column", help="Table column holding the prompt."),
    template: str | None = typer.Option(
        None, "--template", help="Prompt template over columns: 'Q: {text}'."
    ),
    id_column: str | None = typer.Option(None, "--id-column", help="Table column to use as custom_id."),
    chat: bool = typer.Option(False, "--chat", help="Send table prompts as a user chat message."),
    model: str = typer.Option("", "--model", help="Model name recorded on the job."),
    name: str = typer.Option("", "--name", help="Job name (default: the file name)."),
    max_tokens: int | None = typer.Option(None, "--max-tokens", help="Default max_tokens per request."),
    temperature: float | None = typer.Option(None, "--temperature", help="Default temperature."),
    shard_size: int = typer.Option(64, "--shard-size", help="Requests per shard (the unit of leasing)."),
    max_attempts: int = typer.Option(
        3, "--max-attempts", help="Leases a shard may use before dead-lettering."
    ),
    window: str | None = typer.Option(None, "--completion-window", help="Expire after e.g. 24h, 30m."),
    allow_invalid: bool = typer.Option(False, "--allow-invalid", help="Submit valid lines, skip bad ones."),
    dedup: bool = typer.Option(
        True, "--dedup/--no-dedup", help="Compute identical greedy (or same-seed) requests once."
    ),
    group_by_prompt: bool = typer.Option(
        True,
        "--group-by-prompt/--input-order",
        help="Shard by prompt: identical requests together, shared prefixes side by side (results "
        "stay in input order).",
    ),
    wait: bool = typer.Option(False, "--wait", help="Wait with a progress bar until the job ends."),
    redis_url: str | None = RedisUrl,
) -> None:
    """Validate FILE and queue it as a job; prints the job id on stdout."""
    with _exits():
        shared = {  # what both ways to a job take
            "column": column,
            "template": template,
            "chat": chat,
            "model": model,
            "max_tokens": max_tokens,
            "temperature": temperature,
            "completion_window": window,
            "shard_size": shard_size,
            "max_attempts": max_attempts,
            "dedup": dedup,
            "group_by_prompt": group_by_prompt,
        }
        try:
            if workload is not None:
                job = _submit_workload(
                    _client(redis_url), workload, file, option, name=name or workload, **shared
                )
            elif file is None:
                raise ValueError("give FILE, or --workload KIND (synthetic needs no FILE)")
            else:
                job = _client(redis_url).submit_file(
                    file, id_column=id_column, name=name, allow_invalid=allow_invalid, **shared
                )
        except ValueError as exc:
            if isinstance(exc, InvalidInputError):
                raise
            err.print(f"[red]error:[/] {exc}")
            raise typer.Exit(EXIT_USAGE) from None
        except OSError as exc:
            if isinstance(exc, RedisUnavailableError):
                raise
            err.print(f"[red]error:[/] cannot read the input: {exc}")
            raise typer.Exit(EXIT_BAD_INPUT) from None
        except (QueueError, redis.ConnectionError, typer.Exit):
            raise
        except Exception as exc:  # a message, not a traceback; the job (if any) was marked failed
            err.print(f"[red]error:[/] submission failed: {type(exc).__name__}: {exc}")
            raise typer.Exit(EXIT_ERROR) from None
        if job.num_errors:
            err.print(f"[yellow]skipped {job.num_errors} invalid line(s)[/]")
            for e in job.errors[:20]:
                err.print(f"  {e['unit']} {e['line']}: {e['message']}")
        err.print(f"queued {job.request_counts.total} requests in {job.num_shards} shard(s)")
        print(job.id)
        if wait:
            _finish(_client(redis_url).wait(job.id, progress=True))


def _submit_workload(
    client,
    kind: str,
    file: Path | None,
    options: list[str],
    *,
    column,
    template,
    chat,
    model,
    max_tokens,
    **submit_options,
):
    """Requests built by a workload kind (workloads/), then queued like any other list."""
    from workloads.registry import build_requests

    pairs = dict(o.split("=", 1) for o in options if "=" in o)
    if len(pairs) != len(options):
        raise ValueError(f"--option takes key=value, got {[o for o in options if '=' not in o]}")
    requests = build_requests(
        kind,
        file,
        model=model or "harvest",
        column=column,
        max_tokens=max_tokens,
        template=template,
        chat=chat,
        **pairs,
    )
    return client.submit(list(requests), model=model, **submit_options)


@app.command("jobs", epilog=EXIT_CODES)
def list_jobs(
    limit: int = typer.Option(20, "--limit", help="Newest N jobs."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per line."),
    redis_url: str | None = RedisUrl,
) -> None:
    """List jobs, newest first."""
    with _exits():
        jobs = _client(redis_url).list_jobs(limit)
    if as_json:
        for job in jobs:
            print(json.dumps(job.to_dict()))
        return
    table = Table("name", "status", "completed", "failed", "total", "shards")
    table.columns.insert(0, Column("id", no_wrap=True, min_width=26))  # ids get copied: never cut them
    for job in jobs:
        c = job.request_counts
        table.add_row(
            job.id,
            job.name,
            job.status.value,
            str(c.completed),
            str(c.failed),
            str(c.total),
            f"{job.shards_finished}/{job.num_shards}",
        )
    out.print(table)


@app.command(epilog=EXIT_CODES)
def status(
    job_id: str | None = typer.Argument(None, metavar="[JOB]", help="A job; none: the service."),
    wait: bool = typer.Option(False, "--wait", help="Show a live progress bar until the job ends."),
    timeout: float | None = typer.Option(None, "--timeout", help="With --wait: give up after N seconds."),
    as_json: bool = typer.Option(False, "--json", help="Print the job as JSON."),
    redis_url: str | None = RedisUrl,
    address: str = typer.Option("auto", "--address", help="Ray address of the service (no JOB)."),
) -> None:
    """Show a job (with --wait, exit 0 only if it completed), or without JOB the service:
    per-worker online load, offline budget, KV occupancy, running jobs and progress."""
    if job_id is None:
        from harvest.cli.service import show_service_status

        show_service_status(address, as_json)
        return
    with _exits():
        client = _client(redis_url)
        job = client.wait(job_id, timeout=timeout, progress=not as_json) if wait else client.get(job_id)
    if as_json:
        print(json.dumps(job.to_dict()))
    else:
        c = job.request_counts
        out.print(f"[bold]{job.id}[/] {job.name}")
        out.print(f"  status: {job.status.value}")
        out.print(f"  requests: {c.completed} completed, {c.failed} failed, {c.total} total")
        out.print(f"  shards: {job.shards_finished}/{job.num_shards} finished, {job.leased} leased")
        for e in job.errors[:20]:
            out.print(f"  [red]{e['unit']} {e['line']}[/]: {e['message']}")
    if wait and job.status is not JobStatus.COMPLETED:
        raise typer.Exit(EXIT_NOT_COMPLETED)


@app.command(epilog=EXIT_CODES)
def results(
    job_id: str = typer.Argument(..., metavar="JOB"),
    output: Path = typer.Option(
        ..., "-o", "--output", help="out.parquet, or out.jsonl (OpenAI batch format)."
    ),
    redis_url: str | None = RedisUrl,
) -> None:
    """Export a job's results (partial while it runs). JSONL failures go to OUT.errors.jsonl."""
    if output.suffix not in (".parquet", ".jsonl"):
        err.print(f"[red]error:[/] -o must end in .parquet or .jsonl, got {output.name}")
        raise typer.Exit(EXIT_USAGE)
    with _exits():
        client = _client(redis_url)
        job = client.get(job_id)
        client.export(job_id, output)
    if not job.status.is_terminal:
        err.print(f"[yellow]{job_id} is {job.status.value}: exported the results finished so far[/]")
    err.print(f"wrote {output}")


@app.command(epilog=EXIT_CODES)
def cancel(job_id: str = typer.Argument(..., metavar="JOB"), redis_url: str | None = RedisUrl) -> None:
    """Cancel a job; finished results are kept."""
    with _exits():
        job = _client(redis_url).cancel(job_id)
    err.print(f"{job.id} {job.status.value}")


@app.command(epilog=EXIT_CODES)
def purge(
    job_id: str = typer.Argument(..., metavar="JOB"),
    force: bool = typer.Option(False, "--force", help="Cancel the job first if it is still running."),
    redis_url: str | None = RedisUrl,
) -> None:
    """Delete a finished job and its results now (finished jobs expire after the job TTL anyway)."""
    with _exits():
        try:
            keys = _client(redis_url).purge(job_id, force)
        except ValueError as exc:
            err.print(f"[red]refused:[/] {exc}")
            raise typer.Exit(EXIT_USAGE) from None  # a running job needs --force
    err.print(f"{job_id} purged ({keys} keys)")


@app.command(epilog=EXIT_CODES)
def work(
    local: bool = typer.Option(False, "--local", help="Run the local worker loop (no Ray)."),
    model: Path | None = typer.Option(
        None, "--model", help="Model directory (default: the tiny demo model)."
    ),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda[:N]."),
    max_num_seqs: int = typer.Option(
        64, "--max-num-seqs", help="Engine batch size (and offline requests held)."
    ),
    visibility: float = typer.Option(30.0, "--visibility-timeout", help="Lease seconds without a renewal."),
    progress_interval: float = typer.Option(
        1.0, "--progress-interval", help="Seconds between progress saves."
    ),
    exit_when_idle: bool = typer.Option(False, "--exit-when-idle", help="Stop when the queue is empty."),
    redis_url: str | None = RedisUrl,
) -> None:
    """Pull shards from the queue and run them through a local engine until interrupted."""
    if not local:
        err.print("only --local is available here; cluster workers start with `harvest up`")
        raise typer.Exit(EXIT_USAGE)
    import logging
    import signal

    from harvest.engine import Engine
    from harvest.paths import ensure_default_model
    from harvest.queue.config import WorkerConfig
    from harvest.queue.store import JobStore, connect
    from harvest.queue.worker import make_worker_id, run_local
    from harvest.serving.device_profile import DeviceProfile

    try:
        profile = DeviceProfile.for_device(device)
    except ValueError as exc:
        err.print(f"[red]--device:[/] {exc}")
        raise typer.Exit(EXIT_USAGE) from None
    profile.apply()  # this process is the worker: the host tuning its device needs
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    config = WorkerConfig(visibility_timeout_s=visibility, progress_interval_s=progress_interval)
    url = redis_url or default_redis_url()
    with _exits():
        store = JobStore(connect(url))
    # offline only: no online SLOs to size batches against, so skip the start-up latency profile
    engine = Engine.from_pretrained(
        str(model or ensure_default_model()), device=device, max_num_seqs=max_num_seqs, profile_latency=False
    )
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    # finish the step, write what is done and give the rest back instead of dying mid-write
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    worker_id = make_worker_id()
    err.print(f"worker {worker_id} serving {redact_url(url)}")
    try:
        with _exits():
            worker = run_local(
                store,
                engine,
                config,
                stop=lambda: stopping,
                exit_when_idle=exit_when_idle,
                worker_id=worker_id,
            )
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    err.print(f"worker {worker_id} stopped after {worker.stats.results_written} results")
