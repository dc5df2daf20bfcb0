"""`harvest demo`: co-serving in one command, on the embedded default.

Starts everything locally (Redis, Ray, the controller, one worker with the tiny demo model,
the OpenAI-compatible endpoint), submits the bundled offline jobs (summarise 20 documents,
classify 60 support tickets), replays a bursty online trace through the HTTP endpoint at
the same time, and shows both side by side: online latencies stay low while the offline
jobs finish on the same engine. Stops what it started at the end.
"""

from __future__ import annotations

import asyncio
import logging
import os
import statistics
import threading
import time

import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table

from harvest.cli.app import app

console = Console()


def _online_traffic(base: str, model: str, seconds: float, rate: float, results: list[dict]) -> None:
    """A bursty (CV 2) trace of short streamed completions, replayed over HTTP."""
    from workloads.http_replay import replay_http
    from workloads.traces import gamma_arrivals

    arrivals = gamma_arrivals(
        rate, 2.0, duration_s=seconds, prompt_len="uniform:4:24", output_len="uniform:8:32"
    )
    asyncio.run(replay_http(base, model, arrivals, 0, results=results))


@app.command()
def demo(
    seconds: float = typer.Option(20.0, help="How long to send online traffic."),
    rate: float = typer.Option(2.0, help="Online requests per second (bursty, CV 2)."),
    port: int = typer.Option(8000, help="HTTP port for the endpoint."),
) -> None:
    """Co-serve a bursty online trace and two offline jobs on one local engine, then report."""
    import ray
    import transformers

    from harvest import local_redis, service
    from harvest.client import HarvestClient
    from harvest.names import NAMESPACE
    from harvest.paths import ensure_default_model
    from harvest.redact import redact_url
    from harvest.serve_env import use_serve_env
    from workloads.registry import build_requests, sample_dataset

    transformers.utils.logging.disable_progress_bar()
    # Serve's start-up lines would break into the live view (a filter: Serve resets the level)
    logging.getLogger("ray.serve").addFilter(lambda record: record.levelno >= logging.WARNING)
    started_redis = "HARVEST_REDIS_URL" not in os.environ
    redis_url = os.environ.get("HARVEST_REDIS_URL") or local_redis.start()
    with console.status("building the tiny demo model (once, about a minute)..."):
        model = ensure_default_model()
    with console.status("starting Ray, the controller, a worker and the HTTP endpoint..."):
        use_serve_env(private_ports=True)  # the same HAProxy front end as `harvest up`
        ray.init(namespace=NAMESPACE, include_dashboard=False, log_to_driver=False, logging_level="error")
        config = service.ServiceConfig(
            model=str(model),
            redis_url=redis_url,
            model_name="harvest",
            num_workers=1,
            port=port,
            engine_options={"slo": {"ttft_s": 0.5, "tpot_s": 0.05}},
        )
        service.start(config)
    base = f"http://127.0.0.1:{port}"
    console.print(f"[green]up[/]: {base}/v1 (OpenAI-compatible), Redis {redact_url(redis_url)}")
    client = HarvestClient(redis_url)
    jobs = {
        kind: client.submit(
            list(build_requests(kind, sample_dataset(kind), model="harvest")),
            name=f"demo-{kind}",
            shard_size=8,
        )
        for kind in ("summarize", "classify")
    }
    online: list[dict] = []
    traffic = threading.Thread(
        target=_online_traffic, args=(base, "harvest", seconds, rate, online), daemon=True
    )
    start = time.monotonic()
    traffic.start()
    try:
        with Live(console=console, refresh_per_second=4) as live:
            while traffic.is_alive() or any(not client.get(j.id).status.is_terminal for j in jobs.values()):
                live.update(_view(client, jobs, online, time.monotonic() - start))
                time.sleep(0.25)
            live.update(_view(client, jobs, online, time.monotonic() - start))
    finally:
        traffic.join(timeout=10)
        snapshot = service.status()
        service.stop()
        ray.shutdown()
        if started_redis:
            local_redis.stop()
    _report(online, snapshot, time.monotonic() - start)


def _view(client, jobs, online, elapsed: float) -> Table:
    table = Table("what", "progress", title=f"harvest demo, {elapsed:.0f}s")
    for kind, job in jobs.items():
        j = client.get(job.id)
        c = j.request_counts
        table.add_row(
            f"offline: {kind}", f"{j.status.value}: {c.completed}/{c.total} done, {c.failed} failed"
        )
    ttft = sorted(r["ttft_s"] for r in online if r["ttft_s"] is not None)  # None: no token came
    if ttft:
        table.add_row(
            "online requests", f"{len(online)} done, TTFT p50 {1e3 * statistics.median(ttft):.0f} ms"
        )
    return table


def _report(online, snapshot, elapsed: float) -> None:
    from workloads.http_replay import latency_summary

    table = Table("metric", "value", title="co-serving summary")
    if any(r["ttft_s"] is not None for r in online):
        lat = latency_summary(online)
        table.add_row("online requests", str(len(online)))
        table.add_row(
            "online TTFT p50 / p99", f"{1e3 * lat['ttft_p50_s']:.0f} / {1e3 * lat['ttft_p99_s']:.0f} ms"
        )
        table.add_row(
            "online TPOT p50 / p99", f"{1e3 * lat['tpot_p50_s']:.1f} / {1e3 * lat['tpot_p99_s']:.1f} ms"
        )
    for s in snapshot["workers"].values():
        totals = s.get("totals", {})
        table.add_row(
            "tokens generated online / offline",
            f"{totals.get('generated_online', 0)} / {totals.get('generated_offline', 0)}",
        )
        table.add_row(
            "offline preemptions / tokens restored from checkpoints",
            f"{totals.get('preemptions', 0)} / {totals.get('restored_tokens', 0)}",
        )
    table.add_row("wall time", f"{elapsed:.1f} s")
    console.print(table)
    console.print(
        "Next: `harvest up` keeps it running; see README.md for curl, the OpenAI SDK and `harvest submit`."
    )
