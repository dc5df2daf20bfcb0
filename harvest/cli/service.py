"""`harvest up|down` and the service view of `harvest status`."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from harvest.cli.app import app

console = Console()


@app.command()
def up(
    address: str | None = typer.Option(
        None, "--address", help="Existing Ray cluster (e.g. auto); none: local."
    ),
    model: Path | None = typer.Option(
        None, "--model", help="Local HF model dir; default: the tiny demo model."
    ),
    workers: int | None = typer.Option(
        None, "--workers", help="Workers (a Serve replica each); default: one per GPU (or 1)."
    ),
    port: int = typer.Option(8000, "--port", help="HTTP port of the OpenAI-compatible endpoint."),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to listen on (0.0.0.0 on a cluster)."),
    api_key: str | None = typer.Option(None, "--api-key", envvar="HARVEST_API_KEY", help="Require this key."),
    model_name: str = typer.Option("harvest", "--model-name", help="Name clients pass as `model`."),
    job_ttl: str | None = typer.Option(
        None, "--job-ttl", help="Keep finished jobs and their results this long (e.g. 7d, 12h); default 7d."
    ),
) -> None:
    """Start Redis (unless HARVEST_REDIS_URL is set), Ray (unless --address), the controller,
    the workers and the Serve app; print the endpoint and what to try next."""
    from harvest import local_redis, service
    from harvest.cli.jobs import EXIT_BAD_INPUT
    from harvest.client import parse_window
    from harvest.paths import ensure_default_model
    from harvest.redact import redact_url

    try:
        job_ttl_s = parse_window(job_ttl)
    except ValueError:
        job_ttl_s = 0.0
    if job_ttl_s is not None and job_ttl_s <= 0:
        console.print(
            f"[red]--job-ttl[/] must be a positive time like 7d, 12h or 3600 (seconds), got {job_ttl!r}"
        )
        raise typer.Exit(EXIT_BAD_INPUT)
    if model is not None and not (model / "config.json").is_file():
        console.print(f"[red]--model {model}[/]: not a Hugging Face model directory (no config.json)")
        raise typer.Exit(EXIT_BAD_INPUT)
    redis_url = os.environ.get("HARVEST_REDIS_URL")
    if redis_url is None:
        with console.status("starting the embedded Redis..."):
            redis_url = local_redis.start()
    if model is None:
        with console.status("building the tiny demo model (once, about a minute)..."):
            model = ensure_default_model()
    if address is None:
        with console.status("starting a local Ray..."):
            try:
                service.start_local_ray()
            except subprocess.CalledProcessError as exc:
                console.print(f"[red]could not start Ray[/]:\n{(exc.stderr or b'').decode()[-2000:]}")
                raise typer.Exit(1) from None
        address = "auto"
    config = service.ServiceConfig(
        model=str(model),
        redis_url=redis_url,
        model_name=model_name,
        num_workers=workers,
        port=port,
        host=host,
        api_key=api_key,
        job_ttl_s=job_ttl_s,
    )
    service.connect(address)
    with console.status("starting the controller and the workers..."):
        try:
            snapshot = service.start(config)
        except (RuntimeError, TimeoutError) as exc:
            console.print(f"[red]harvest did not come up[/]: {exc}")
            raise typer.Exit(1) from None
    base = f"http://{host}:{port}"
    console.print(f"[green]harvest is up[/]: {len(snapshot['workers'])} worker(s), model {model_name!r}")
    console.print(f"  endpoint  {base}/v1   (OpenAI-compatible)   redis {redact_url(redis_url)}")
    console.print("next:")
    console.print(
        f"  curl {base}/v1/completions -H 'Content-Type: application/json' "
        f'-d \'{{"model": "{model_name}", "prompt": "The miller", "max_tokens": 16}}\''
    )
    console.print("  harvest submit workloads/data/classify_tickets.csv --column text --wait")
    console.print("  harvest status            # workers, budgets, jobs")
    console.print("  harvest down")


@app.command()
def down(
    address: str = typer.Option("auto", "--address", help="Ray address of the service."),
    keep_ray: bool = typer.Option(False, "--keep-ray", help="Leave the local Ray running."),
    keep_redis: bool = typer.Option(False, "--keep-redis", help="Leave the embedded Redis running."),
) -> None:
    """Stop what `harvest up` started (leased shards go back to the queue)."""
    from harvest import local_redis, service

    try:
        service.connect(address)
        service.stop()
        console.print("service stopped")
        import ray

        ray.shutdown()  # before `ray stop`, or the driver prints the cluster's shutdown as errors
    except ConnectionError:
        console.print("no Ray cluster running")
    if not keep_ray:
        subprocess.run(["ray", "stop"], capture_output=True)
    if not keep_redis and "HARVEST_REDIS_URL" not in os.environ and local_redis.stop():
        console.print("embedded Redis stopped (its data stays in the data dir)")


def show_service_status(address: str, as_json: bool) -> None:
    from harvest import service

    try:
        service.connect(address)
        snapshot = service.status()
    except (ConnectionError, ValueError) as exc:
        console.print(f"[red]harvest is not running[/] ({exc}); start it with `harvest up`")
        raise typer.Exit(1) from None
    if as_json:
        print(json.dumps(snapshot, default=str))
        return
    table = Table(
        "worker",
        "healthy",
        "online run/wait",
        "offline run/wait",
        "offline",
        "SLO share",
        "KV used",
        "step ms",
        "shards",
        title="workers",
    )
    for name, s in sorted(snapshot["workers"].items()):
        step = s.get("last_step", {})
        table.add_row(
            name,
            "yes" if s.get("healthy") else "NO",
            f"{step.get('online_running', 0)}/{step.get('online_waiting', 0)}",
            f"{step.get('offline_running', 0)}/{step.get('offline_waiting', 0)}",
            "[red]paused[/]" if s.get("offline_paused") else "on" if s.get("offline_enabled") else "off",
            f"{s.get('slo_scale', 1.0):.2f}",  # of the SLO the engine plans for (controller/feedback.py)
            f"{s.get('kv_blocks_used', 0)}/{s.get('kv_blocks_total', 0)}",
            f"{1e3 * step.get('measured_latency_s', 0):.1f}",
            str(len(s.get("shards", []))),
        )
    console.print(table)
    for name, s in sorted(snapshot["workers"].items()):
        if s.get("offline_paused"):
            console.print(f"[yellow]{name}: offline paused: {s['offline_paused']}[/]")
    if snapshot.get("redis_error"):
        console.print(f"[yellow]controller: Redis failing ({snapshot['redis_error']}); no job list[/]")
    jobs = Table("job", "name", "status", "completed", "failed", "total", title="jobs")
    for j in snapshot["jobs"]:
        c = j.get("request_counts", {})
        jobs.add_row(
            j["id"],
            j.get("name", ""),
            j["status"],
            str(c.get("completed")),
            str(c.get("failed")),
            str(c.get("total")),
        )
    console.print(jobs)
