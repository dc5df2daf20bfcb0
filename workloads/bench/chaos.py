"""`harvest bench chaos`: faults injected into a running service, and what each one cost.

One local service (two workers behind Serve's HAProxy, the controller, a private Redis
with an append-only file) under steady streaming online load. Each phase submits an
offline job, waits until a worker is busy with it, injects one fault, and waits for the
job to finish:

| phase | fault |
|---|---|
| baseline | none |
| worker | SIGKILL of a worker replica holding shards of the job |
| redis | SIGKILL of redis-server, restarted from its AOF after `outage_s` (> the lease timeout) |
| controller | SIGKILL of the harvest controller (Ray restarts it) |
| serve-controller | SIGKILL of Serve's controller (Ray restarts it) |

Reported per phase: online requests failed, of those how many had already received
tokens (streaming on the killed worker: the only failures the design allows), how many
connections broke before any response and were sent again by the client (as the openai
SDK does; `load.CLIENT_RETRIES`), the longest
gap with no online token delivered, and, for the job, requests lost (no result),
duplicated (more than one result row), and lease attempts charged beyond the one each
shard needs. The rule under test: a fault costs exactly what caused it.
"""

from __future__ import annotations

import os
import signal
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from harvest.local_redis import RedisProcess
from workloads.bench.common import console, local_ray, print_table, write_result
from workloads.bench.load import OnlineLoad, longest_gap

MODEL_NAME = "chaos"
PHASES = ("baseline", "worker", "redis", "controller", "serve-controller")


def _config(quick: bool) -> dict[str, Any]:
    return {
        "clients": 2 if quick else 4,
        "online_max_tokens": 16,
        "job_requests": 32 if quick else 64,
        "job_max_tokens": 384 if quick else 512,  # a job outlasts its fault: several seconds per shard
        "shard_size": 4,
        "visibility_timeout_s": 5.0,
        "outage_s": 8.0,  # Redis down longer than the visibility timeout
        "hidden": 96 if quick else 128,
        "layers": 3 if quick else 4,
    }


def _start_service(model: Path, redis_url: str, cfg: dict[str, Any]) -> str:
    from workloads.bench.e2e import start_service

    return start_service(
        model,
        redis_url,
        model_name=MODEL_NAME,
        num_workers=2,
        engine_options={"block_size": 16, "num_blocks": 512, "max_num_seqs": 16, "profile_latency": False},
        queue_options={
            "visibility_timeout_s": cfg["visibility_timeout_s"],
            "progress_interval_s": 0.25,
            "max_shards": 2,
            "idle_poll_s": 0.05,
        },
    )


def _wait(predicate, timeout: float, what: str, interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if predicate():
                return
        except Exception:  # Redis or a controller restarting: ask again
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(interval)


def _healthy_workers() -> int:
    from harvest import service

    return sum(bool(s.get("healthy")) for s in service.status()["workers"].values())


def _holder(job_id: str) -> tuple[str, dict] | None:
    """A worker holding shards of the job, with its stats."""
    from harvest import service

    for name, stats in service.status()["workers"].items():
        if any(k.startswith(job_id) for k in stats.get("shards", [])):
            return name, stats
    return None


def _actor_pid(handle) -> int:
    import ray

    return ray.get(handle.__ray_call__.remote(lambda self: os.getpid()), timeout=30)


def _inject(phase: str, job_id: str, redis: RedisProcess, cfg: dict[str, Any]) -> dict[str, Any]:
    import ray

    from harvest import service

    if phase == "worker":
        deadline, holder = time.monotonic() + 30, None
        while holder is None and time.monotonic() < deadline:
            holder = _holder(job_id)
        if holder is None:
            raise RuntimeError("the job finished before a worker could be killed: make it longer")
        name, stats = holder
        os.kill(stats["pid"], signal.SIGKILL)
        return {"killed": name, "shards_held": len([k for k in stats["shards"] if k.startswith(job_id)])}
    if phase == "redis":
        redis.kill()
        time.sleep(cfg["outage_s"])
        redis.start()
        return {"outage_s": cfg["outage_s"]}
    if phase == "controller":
        os.kill(_actor_pid(service.controller_handle()), signal.SIGKILL)
        return {}
    if phase == "serve-controller":
        from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

        os.kill(_actor_pid(ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)), signal.SIGKILL)
        return {}
    return {}


def _job_accounting(client, store, job_id: str, total: int) -> dict[str, Any]:
    job = client.get(job_id)
    rows = client.results(job_id).to_pylist()
    per_id = Counter(r["custom_id"] for r in rows)
    attempts = [int(store.shard_info(job_id, n).get("attempts", 1)) for n in range(job.num_shards)]
    return {
        "status": job.status.value,
        "lost": total - len(per_id),
        "duplicated": sum(c - 1 for c in per_id.values()),
        "errors": sum(r["error_code"] is not None for r in rows),
        "attempts_charged": sum(max(0, a - 1) for a in attempts),
        "resumed_requests": sum((r.get("resumed_tokens") or 0) > 0 for r in rows),
    }


def _phase(phase: str, load: OnlineLoad, redis: RedisProcess, cfg: dict[str, Any]) -> dict[str, Any]:
    from harvest.client import HarvestClient
    from harvest.queue.store import JobStore

    client = HarvestClient(redis.url)
    total = cfg["job_requests"]
    prompts = [f"{phase} document {i}: the river ran past the mill and the miller" for i in range(total)]
    job = client.submit(
        prompts,
        model=MODEL_NAME,
        max_tokens=cfg["job_max_tokens"],
        temperature=0,
        shard_size=cfg["shard_size"],
        defaults={"ignore_eos": True},
    )
    _wait(lambda: _holder(job.id) is not None, 60, "a worker to lease the job")
    time.sleep(0.5)  # some progress, and checkpoints, to lose
    first_request = len(load.requests)
    t_fault = time.monotonic()
    details = _inject(phase, job.id, redis, cfg)
    _wait(lambda: client.get(job.id).status.is_terminal, 300, f"the {phase} job to finish", interval=0.25)
    t_done = time.monotonic()
    _wait(lambda: _healthy_workers() == 2, 180, "both workers healthy again", interval=0.25)
    store = JobStore.from_url(redis.url)
    offline = _job_accounting(client, store, job.id, total)
    # requests that were in flight at the fault or started before the job was done
    window = [r for r in load.requests[:] if r.end >= t_fault and r.start <= t_done] or []
    window += [r for r in load.requests[:first_request] if r.end == 0.0]
    failed = [r for r in window if r.end and not r.ok]
    return {
        "phase": phase,
        **details,
        "online_requests": len(window),
        "online_failed": len(failed),
        "online_failed_mid_stream": sum(r.got_tokens for r in failed),
        # connections that broke before any response, sent again by the client (load.CLIENT_RETRIES)
        "online_client_retries": sum(r.retries for r in window),
        "online_failures": sorted({r.error or "" for r in failed}),
        "longest_online_gap_s": longest_gap(load.token_times, t_fault, t_done),
        "recovery_s": t_done - t_fault,
        **{f"offline_{k}": v for k, v in offline.items()},
    }


def _verdict(phases: list[dict[str, Any]]) -> dict[str, bool]:
    by = {p["phase"]: p for p in phases}
    return {
        "no_offline_request_lost": all(p["offline_lost"] == 0 for p in phases),
        "no_offline_request_duplicated": all(p["offline_duplicated"] == 0 for p in phases),
        "jobs_completed": all(p["offline_status"] == "completed" for p in phases),
        # only requests already streaming on the killed worker may fail, and nothing else anywhere
        "online_failures_only_mid_stream_on_killed_worker": all(
            p["online_failed"] == (p["online_failed_mid_stream"] if p["phase"] == "worker" else 0)
            for p in phases
        ),
        "no_attempt_charged_for_redis_restart": by.get("redis", {}).get("offline_attempts_charged", 0) == 0,
    }


def plot_timeline(load: OnlineLoad, marks: list[tuple[str, float, float]], t0: float, path: Path) -> None:
    """Online tokens/s over the run, each fault's window shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    times = [t - t0 for t in load.token_times]
    fig, ax = plt.subplots(figsize=(11, 3.5))
    if times:
        width = 0.5
        bins = int(max(times) / width) + 1
        counts = [0] * bins
        for t in times:
            counts[int(max(t, 0) / width)] += 1
        ax.plot([i * width for i in range(bins)], [c / width for c in counts], color="tab:blue", linewidth=1)
    for (name, start, end), color in zip(
        marks, ("tab:gray", "tab:red", "tab:orange", "tab:purple", "tab:brown")
    ):
        ax.axvspan(start - t0, end - t0, alpha=0.15, color=color, label=name)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("online tokens/s delivered")
    ax.set_title("Online tokens delivered while faults are injected (shaded: fault until its job finished)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(quick: bool, out: Path) -> dict:
    import transformers

    from harvest import service
    from harvest.models.tiny import make_tiny

    transformers.utils.logging.disable_progress_bar()
    cfg = _config(quick)
    phases: list[dict[str, Any]] = []
    marks: list[tuple[str, float, float]] = []
    with tempfile.TemporaryDirectory(prefix="harvest-chaos-") as tmp:
        model = make_tiny(Path(tmp) / "model", "llama", hidden=cfg["hidden"], layers=cfg["layers"], heads=4)
        (Path(tmp) / "redis").mkdir()
        redis = RedisProcess(Path(tmp) / "redis")
        redis.start()
        load: OnlineLoad | None = None
        try:
            with local_ray(num_cpus=max(4, os.cpu_count() or 1)):
                base = _start_service(model, redis.url, cfg)
                load = OnlineLoad(base, MODEL_NAME, cfg["clients"], cfg["online_max_tokens"])
                t0 = time.monotonic()
                thread = load.run()
                try:
                    for phase in PHASES:
                        with console.status(f"phase {phase}..."):
                            start = time.monotonic()
                            phases.append(_phase(phase, load, redis, cfg))
                            marks.append((phase, start, time.monotonic()))
                        p = phases[-1]
                        console.print(
                            f"{phase}: online failed {p['online_failed']}, "
                            f"gap {p['longest_online_gap_s']:.2f} s, lost {p['offline_lost']}, "
                            f"charged {p['offline_attempts_charged']}"
                        )
                finally:
                    load.stop.set()
                    thread.join(timeout=90)
                    service.stop()
        finally:
            redis.stop()
    verdict = _verdict(phases)
    result = {
        "config": {**cfg, "quick": quick},
        "phases": phases,
        "verdict": verdict,
        "target_met": all(verdict.values()),
    }
    print_table(
        "chaos: what each fault cost",
        [
            "phase",
            "online failed",
            "of which mid-stream",
            "client retries",
            "longest gap s",
            "offline lost",
            "duplicated",
            "attempts charged",
            "job",
        ],
        [
            [
                p["phase"],
                p["online_failed"],
                p["online_failed_mid_stream"],
                p["online_client_retries"],
                p["longest_online_gap_s"],
                p["offline_lost"],
                p["offline_duplicated"],
                p["offline_attempts_charged"],
                p["offline_status"],
            ]
            for p in phases
        ],
    )
    console.print({k: ("met" if v else "MISSED") for k, v in verdict.items()})
    if load is not None:
        plot_timeline(load, marks, t0, out / "chaos_timeline.png")
    write_result(out, "chaos", result)
    return result
