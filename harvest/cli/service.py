"""`harvest up|down` and the service view of `harvest status`."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console
from rich.markup import escape  # errors quote user input, such as ORG/NAME[@REVISION] or paths
from rich.table import Table

from harvest.cli.app import app
from harvest.cli.exits import EXIT_BAD_INPUT, EXIT_NOT_FOUND, EXIT_REDIS

if TYPE_CHECKING:
    from harvest.config import HarvestConfig

console = Console()
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _flags(options: dict[str, Any]) -> dict[str, Any]:
    """The config flags a person gave to `up` or `config show` (`options`: the command's
    parameters; typer hands the ones not given as None or [])."""
    flags = {**options, "api_key": _api_keys(options.get("api_key"))}
    flags.pop("config_file", None)
    return {key: value for key, value in flags.items() if value not in (None, [])}


def _effective_config(config_file: Path | None, flags: dict[str, Any]) -> HarvestConfig:
    """The file's keys with the flags on top, or exit 3 naming the bad key (and the file)."""
    from harvest.config import ConfigError, load_config

    try:
        return load_config(config_file, flags)
    except ConfigError as exc:
        console.print(f"[red]bad configuration[/]: {escape(str(exc))}")
        raise typer.Exit(EXIT_BAD_INPUT) from None


# the options `up` and `config show` share: every key of harvest/config.py's HarvestConfig
ConfigFile = typer.Option(None, "--config", help="YAML file of these options (flags override it).")
ModelOpt = typer.Option(
    None,
    "--model",
    help="Local HF model dir, or Hub id ORG/NAME or ORG/NAME@REVISION; default: the tiny demo model.",
)
ServedNames = typer.Option(
    None,
    "--served-model-name",
    "--model-name",
    help="Name clients pass as `model` (repeat for several); default: the Hub id, else 'harvest'.",
)
WorkersOpt = typer.Option(
    None, "--workers", help="Workers (a Serve replica each); default: one per GPU, or 1."
)
DtypeOpt = typer.Option(
    None, "--dtype", help="auto|bfloat16|float16|float32 (auto: the checkpoint's on CUDA)."
)
KVOpt = typer.Option(
    None, "--kv-cache-memory", help="KV per worker: bytes (2GiB) or a fraction (0.8) of free GPU memory."
)
MaxLenOpt = typer.Option(None, "--max-model-len", help="Longest prompt + output; default: the model's.")
PolicyOpt = typer.Option(None, "--policy", help="harvest|priority-recompute|fcfs|online-only.")
TTFTOpt = typer.Option(None, "--slo-ttft-ms", help="Online time-to-first-token target (default 1000).")
TPOTOpt = typer.Option(None, "--slo-tpot-ms", help="Online time-per-output-token target (default 100).")
PortOpt = typer.Option(None, "--port", help="HTTP port of the OpenAI-compatible endpoint (default 8000).")
HostOpt = typer.Option(None, "--host", help="Interface to listen on (default 127.0.0.1; 0.0.0.0: all).")
KeyOpt = typer.Option(
    None,
    "--api-key",
    envvar="HARVEST_API_KEY",
    help="Require this key (KEY or NAME:KEY); repeat for several, each a tenant; or $HARVEST_API_KEYS=k1,k2.",
)
KeyFileOpt = typer.Option(
    None, "--api-key-file", help="Require the keys in this file (KEY or NAME:KEY lines)."
)
AddressOpt = typer.Option(None, "--address", help="Existing Ray cluster (e.g. auto); none: local.")
TTLOpt = typer.Option(
    None, "--job-ttl", help="Keep finished jobs and their results this long (e.g. 7d, 12h); default 7d."
)
NoticeOpt = typer.Option(
    None,
    "--termination-notice",
    help="A file path on every node: a worker drains when it appears there (spot termination notice).",
)


def _api_keys(given: list[str] | None) -> str | list[str] | None:
    """--api-key (repeatable, or $HARVEST_API_KEY), else the comma-separated $HARVEST_API_KEYS."""
    keys = given or [key for key in os.environ.get("HARVEST_API_KEYS", "").split(",") if key.strip()]
    return keys[0] if len(keys) == 1 else keys or None


@app.command()
def up(
    config_file: Path | None = ConfigFile,
    address: str | None = AddressOpt,
    model: str | None = ModelOpt,
    served_model_name: list[str] | None = ServedNames,
    workers: int | None = WorkersOpt,
    dtype: str | None = DtypeOpt,
    kv_cache_memory: str | None = KVOpt,
    max_model_len: int | None = MaxLenOpt,
    policy: str | None = PolicyOpt,
    slo_ttft_ms: float | None = TTFTOpt,
    slo_tpot_ms: float | None = TPOTOpt,
    port: int | None = PortOpt,
    host: str | None = HostOpt,
    api_key: list[str] | None = KeyOpt,
    api_key_file: Path | None = KeyFileOpt,
    job_ttl: str | None = TTLOpt,
    termination_notice: Path | None = NoticeOpt,
) -> None:
    """Start Redis (unless HARVEST_REDIS_URL is set), Ray (unless --address), the controller,
    the workers and the Serve app; print the endpoint and what to try next."""
    options = dict(locals())  # the parameters, before anything else is bound
    from harvest import local_ray, local_redis, service
    from harvest.config import ConfigError, redis_url_of
    from harvest.models.resolve import ModelUnavailable, resolve_model
    from harvest.paths import ensure_default_model
    from harvest.queue.errors import RedisUnavailableError
    from harvest.queue.store import connect as connect_redis
    from harvest.redact import redact_url

    flags = _flags(options)
    config = _effective_config(config_file, flags)
    try:
        api_key = config.resolved_api_key()
    except ConfigError as exc:
        console.print(f"[red]bad configuration[/]: {escape(str(exc))}")
        raise typer.Exit(EXIT_BAD_INPUT) from None
    if api_key is None and config.host not in LOOPBACK:
        console.print(
            f"[bold red]WARNING: listening on {config.host} with no API key[/]: anyone who "
            "can reach this port can use the model; set --api-key-file"
        )
    names = config.model_names()
    if config.model is not None:  # a Hub id is fetched here, once, before anything starts
        try:
            with console.status(f"finding {config.model}..."):
                resolve_model(config.model)
        except ModelUnavailable as exc:
            console.print(f"[red]--model[/] {escape(str(exc))}")
            raise typer.Exit(EXIT_BAD_INPUT) from None
    redis_url = redis_url_of(config)
    try:
        if redis_url is None:
            with console.status("starting the embedded Redis..."):
                redis_url = local_redis.start()
        connect_redis(redis_url)  # refuses a Redis that would lose or never run jobs, before Ray starts
    except (RuntimeError, RedisUnavailableError) as exc:  # RedisConfigError is a RuntimeError
        console.print(f"[red]Redis[/]: {escape(str(exc))}")
        raise typer.Exit(EXIT_REDIS) from None
    model_path = config.model
    if model_path is None:
        with console.status("building the tiny demo model (once, about a minute)..."):
            model_path = str(ensure_default_model())
    address = config.address
    if address is None:
        with console.status("starting a local Ray..."):
            try:
                local_ray.start()
            except subprocess.CalledProcessError as exc:
                console.print(f"[red]could not start Ray[/]:\n{(exc.stderr or b'').decode()[-2000:]}")
                raise typer.Exit(1) from None
        address = "auto"
    settings = service.service_config(config, model_path, redis_url)
    service.connect(address)
    with console.status("starting the controller and the workers..."):
        try:
            snapshot = service.start(settings)
        except (RuntimeError, TimeoutError) as exc:
            console.print(f"[red]harvest did not come up[/]: {exc}")
            raise typer.Exit(1) from None
    base = f"http://{config.host}:{config.port}"
    model_name = names[0]
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


config_app = typer.Typer(help="The effective configuration of `harvest up`.", no_args_is_help=True)
app.add_typer(config_app, name="config")


@config_app.command("show")
def config_show(
    config_file: Path | None = ConfigFile,
    address: str | None = AddressOpt,
    model: str | None = ModelOpt,
    served_model_name: list[str] | None = ServedNames,
    workers: int | None = WorkersOpt,
    dtype: str | None = DtypeOpt,
    kv_cache_memory: str | None = KVOpt,
    max_model_len: int | None = MaxLenOpt,
    policy: str | None = PolicyOpt,
    slo_ttft_ms: float | None = TTFTOpt,
    slo_tpot_ms: float | None = TPOTOpt,
    port: int | None = PortOpt,
    host: str | None = HostOpt,
    api_key: list[str] | None = KeyOpt,
    api_key_file: Path | None = KeyFileOpt,
    job_ttl: str | None = TTLOpt,
    termination_notice: Path | None = NoticeOpt,
) -> None:
    """Print the config `harvest up` would run with these flags (file, then flags) as YAML,
    secrets masked; nothing is started and no model is fetched."""
    options = dict(locals())  # the parameters, before anything else is bound
    import yaml

    flags = _flags(options)
    config = _effective_config(config_file, flags)
    from harvest.config import redis_url_of

    shown = config.model_copy(update={"redis_url": redis_url_of(config)}).redacted()
    print(yaml.safe_dump(shown, sort_keys=False), end="")


@app.command()
def down(
    address: str = typer.Option("auto", "--address", help="Ray address of the service."),
    keep_ray: bool = typer.Option(
        False, "--keep-ray", help="Leave the local Ray running (if `up` started it)."
    ),
    keep_redis: bool = typer.Option(False, "--keep-redis", help="Leave the embedded Redis running."),
) -> None:
    """Stop what `harvest up` started (leased shards go back to the queue)."""
    from harvest import local_ray, local_redis, service

    running = False
    try:
        service.connect(address)
        running = True
        service.stop()
        console.print("service stopped")
        import ray

        ray.shutdown()  # before `ray stop`, or the driver prints the cluster's shutdown as errors
    except ConnectionError:
        console.print("no Ray cluster running")
    if not keep_ray:
        if local_ray.stop():
            console.print("the local Ray that `harvest up` started is stopped")
        elif running:
            console.print("Ray left running: `harvest up` did not start it (`ray stop` stops it)")
    if not keep_redis and "HARVEST_REDIS_URL" not in os.environ and local_redis.stop():
        console.print("embedded Redis stopped (its data stays in the data dir)")


def _seconds(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}"  # absent from an older controller


@app.command()
def drain(
    target: str = typer.Argument(..., help="A worker id, or a node id (or a prefix naming one node)."),
    address: str = typer.Option("auto", "--address", help="Ray address of the service."),
    reason: str = typer.Option("harvest drain", "--reason", help="Why: shown in `harvest status`."),
) -> None:
    """Drain a worker, or every worker on a node: it takes no new work, hands its offline
    requests back with their KV checkpoints shipped to a node that stays (no attempt
    spent), finishes its online requests and leaves. `harvest status` shows its progress.
    Exit codes: 0 ordered (again: the same order), 1 harvest not running, 4 unknown worker or node."""
    from harvest import service

    try:
        service.connect(address)
        service.controller_handle()
    except (ConnectionError, ValueError) as exc:
        console.print(f"[red]harvest is not running[/] ({exc}); start it with `harvest up`")
        raise typer.Exit(1) from None
    try:
        answer = service.drain(target, reason)
    except ValueError as exc:  # the controller's own error, through Ray
        console.print(f"[red]drain[/]: {escape(str(getattr(exc, 'cause', None) or exc))}")
        raise typer.Exit(EXIT_NOT_FOUND) from None
    where = answer["order"]["keeper_node"] or "their own node (no other node stays)"
    console.print(f"draining {', '.join(answer['workers'])}; checkpoints go to node {where}")


def _offline_column(s: dict[str, Any]) -> str:
    if s.get("draining"):
        return f"[yellow]{s['draining']['state']}[/]"  # draining, serving out, drained
    return "[red]paused[/]" if s.get("offline_paused") else "on" if s.get("offline_enabled") else "off"


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
            _offline_column(s),
            f"{s.get('slo_scale', 1.0):.2f}",  # of the SLO the engine plans for (harvest/serving/feedback.py)
            f"{s.get('kv_blocks_used', 0)}/{s.get('kv_blocks_total', 0)}",
            f"{1e3 * step.get('measured_latency_s', 0):.1f}",
            str(len(s.get("shards", []))),
        )
    console.print(table)
    for name, s in sorted(snapshot["workers"].items()):
        if drain := s.get("draining"):
            given = drain.get("offline") or {}
            handed = f"{given.get('shards', 0)} shards, {given.get('requests', 0)} requests handed back"
            console.print(f"{name}: {drain['state']} ({escape(drain['reason'])}); {handed}, "
                          f"{given.get('checkpointed_tokens', 0)} tokens checkpointed")  # fmt: skip
        if s.get("offline_paused"):
            console.print(f"[yellow]{name}: offline paused: {s['offline_paused']}[/]")
    if snapshot.get("redis_error"):
        console.print(f"[yellow]controller: Redis failing ({snapshot['redis_error']}); no job list[/]")
    jobs = Table("job", "tenant", "name", "status", "completed", "failed", "total", "tokens", "device s",
                 title="jobs")  # fmt: skip
    for j in snapshot["jobs"]:
        c = j.get("request_counts", {})
        jobs.add_row(
            j["id"],
            j.get("owner", ""),
            j.get("name", ""),
            j["status"],
            str(c.get("completed")),
            str(c.get("failed")),
            str(c.get("total")),
            str(j.get("harvested_tokens", "")),  # prompt + completion tokens of its results
            _seconds(j.get("device_seconds")),  # the engine time they took
        )
    console.print(jobs)
    if tenants := snapshot.get("tenants"):
        table = Table("tenant", "harvested tokens", "device s", "fair-share tokens", title="tenants")
        for tenant, usage in tenants.items():
            seconds = _seconds(usage.get("device_seconds"))
            table.add_row(tenant or "(no owner)", str(usage["harvested"]), seconds, str(usage["served"]))
        console.print(table)
    if queued := {due: n for due, n in snapshot.get("queued_by_deadline", {}).items() if n}:
        words = {"none": "with no window", "later": "due later than 7d"}
        due = ", ".join(f"{n} {words.get(d, f'due within {d}')}" for d, n in queued.items())
        console.print(f"offline requests queued: {due}")
