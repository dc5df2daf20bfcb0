"""`harvest bench scale`: does offline throughput scale with workers, and does one Redis keep up?

1. Offline throughput of 1, 2, 4, 8 (full: up to 16) simulated workers on one job. Each
   worker is a process running the real `run_local` loop (OfflineWorker over the real Redis
   queue) around a real engine on `device="sim:h100-8b"`: the real scheduler and block
   manager, steps that sleep for what an 8B model's step costs on one H100. Processes, not
   Ray actors or Serve replicas: on a 2-core box 8 Ray worker processes plus raylet and GCS
   cost more CPU than the workers themselves and would measure Ray's start-up, not the
   queue; `run_local` is the same OfflineWorker the Serve replica drives. The workers start
   once and wait on a pipe; for each count a job of `PER_WORKER` x count requests (weak
   scaling: each round runs about as long) is submitted before they are released, and the
   clock stops at the last result written. `scaling_efficiency` = throughput at
   `max_workers` / (max_workers x throughput of one). Target >= 0.9 at 8 workers.
2. One Redis moving offline requests end to end with a null engine: submit (the real
   `submit`), then several client processes lease shards, write every result (instant, in
   step-sized groups, with progress saves) and ack, the worker's Redis access pattern
   (`workloads.bench.queue.drain_fake`). `queue_requests_per_s` (target >= 10,000) is
   requests / (submit + drain wall); Redis's own CPU per request bounds what one Redis could
   do with faster clients.
3. The controller under 1,000 simulated workers (full: 100, 300 and 1,000):
   `workloads.bench.controller_load`. `controller_cpu_fraction_1000` (target <= 0.1 of a
   core), heartbeat round trips, the reporters' own CPU and the staleness of its view.
"""

from __future__ import annotations

import multiprocessing
import tempfile
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from harvest.local_redis import private_redis
from harvest.queue import JobStore
from workloads.bench.common import console, local_ray, print_table, write_result
from workloads.bench.controller_load import CPU_TARGET, measure_fleet
from workloads.bench.queue import _throughput_client, make_job, redis_cpu

PROFILE = "sim:h100-8b"
PER_WORKER = 384  # requests per worker in each round: ~6 shards each, seconds of work
SHARD_SIZE = 64
SAMPLING = {"max_tokens": 64, "temperature": 0, "ignore_eos": True}
EFFICIENCY_TARGET = 0.9
QUEUE_TARGET = 10_000
QUEUE_CLIENTS = 4


def _worker(model: str, url: str, index: int, conn) -> None:
    """A simulated worker process: builds its engine once, then drains the queue each time it
    is told to, answering with what it did."""
    import logging

    import torch
    import transformers

    from harvest.engine import Engine
    from harvest.queue import WorkerConfig, run_local
    from harvest.serving.device_profile import DeviceProfile

    transformers.logging.set_verbosity_error()
    logging.disable(logging.WARNING)
    # the simulated device computes nothing worth a thread pool; idle pool threads still
    # cost CPU, and eight workers share two cores
    torch.set_num_threads(1)
    DeviceProfile.for_device(PROFILE).apply()  # this process is the worker
    # offline only: no latency budget applies, so the start-up latency profile is skipped
    engine = Engine.from_pretrained(model, device=PROFILE, profile_latency=False)
    store = JobStore.from_url(url)
    conn.send("ready")
    while conn.recv() == "go":
        cpu, device = time.process_time(), engine.runner.device_s
        worker = run_local(
            store, engine, WorkerConfig(idle_poll_s=0.02), exit_when_idle=True, worker_id=f"sim-{index}"
        )
        stats = worker.stats
        conn.send(
            {
                "results": stats.results_written,
                "last_result_at": stats.last_result_at,
                "engine_s": stats.engine_s,
                "cpu_s": time.process_time() - cpu,
                "device_s": engine.runner.device_s - device,
            }
        )


class Fleet:
    """`size` simulated worker processes, started once, released `n` at a time."""

    def __init__(self, model: Path, url: str, size: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conns = []
        self.procs = []
        for i in range(size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(str(model), url, i, child), daemon=True)
            proc.start()
            self.conns.append(parent)
            self.procs.append(proc)
        for conn in self.conns:
            if conn.recv() != "ready":
                raise RuntimeError("a simulated worker failed to start")

    def run(self, n: int) -> list[dict[str, Any]]:
        for conn in self.conns[:n]:
            conn.send("go")
        return [conn.recv() for conn in self.conns[:n]]

    def close(self) -> None:
        for conn in self.conns:
            conn.send("stop")
        for proc in self.procs:
            proc.join(timeout=30)


def measure_round(fleet: Fleet, store: JobStore, n: int) -> dict[str, Any]:
    """One job of `PER_WORKER` x n requests through n workers, timed to its last result."""
    requests = PER_WORKER * n
    make_job(store, requests, SHARD_SIZE, SAMPLING, words=5)  # ~20-token prompts
    cpu0 = redis_cpu(store.r)
    start = time.perf_counter()  # CLOCK_MONOTONIC on Linux: the workers' clock too
    done = fleet.run(n)
    wall = max(d["last_result_at"] for d in done) - start
    assert sum(d["results"] for d in done) == requests, done
    return {
        "workers": n,
        "requests": requests,
        "wall_s": wall,
        "requests_per_s": requests / wall,
        "tokens_per_s": requests * SAMPLING["max_tokens"] / wall,
        "worker_cpu_fraction": sum(d["cpu_s"] for d in done) / (n * wall),
        # how busy the host kept each simulated GPU: profile time of its steps / wall
        "device_busy_fraction": sum(d["device_s"] for d in done) / (n * wall),
        # wall of the engine steps / their profile time: above 1 when the host lags (CPU)
        "step_overrun": sum(d["engine_s"] for d in done) / max(1e-9, sum(d["device_s"] for d in done)),
        "redis_cpu_fraction": (redis_cpu(store.r) - cpu0) / wall,
    }


def measure_scaling(model: Path, url: str, counts: list[int], repeats: int) -> dict[str, Any]:
    store = JobStore.from_url(url)
    fleet = Fleet(model, url, max(counts))
    samples: list[dict[str, Any]] = []
    try:
        # warm-up: every worker's first steps and script loading
        make_job(store, SHARD_SIZE * max(counts), SHARD_SIZE, SAMPLING, words=5)
        fleet.run(max(counts))
        # counts interleaved, best of `repeats` each: a shared box only ever slows a round
        for _ in range(repeats):
            samples += [measure_round(fleet, store, n) for n in counts]
    finally:
        fleet.close()
    rounds = [
        max((s for s in samples if s["workers"] == n), key=lambda s: s["requests_per_s"]) for n in counts
    ]
    one, top = rounds[0], rounds[-1]
    efficiency = top["requests_per_s"] / (top["workers"] * one["requests_per_s"])
    return {
        "profile": PROFILE,
        "workers_are": "processes running run_local (OfflineWorker + Engine on the simulated device)",
        "per_worker_requests": PER_WORKER,
        "shard_size": SHARD_SIZE,
        "sampling": SAMPLING,
        "repeats": repeats,
        "rounds": rounds,
        "all_rounds": samples,
        "max_workers": top["workers"],
        "scaling_efficiency": efficiency,
        "target": EFFICIENCY_TARGET,
        "meets_target": efficiency >= EFFICIENCY_TARGET,
    }


def measure_queue(url: str, requests: int) -> dict[str, Any]:
    store = JobStore.from_url(url)
    make_job(store, 256)  # warm-up: script loading
    _throughput_client(url, 99)
    with multiprocessing.get_context("spawn").Pool(QUEUE_CLIENTS) as pool:
        # clients are up before the clock runs: a pool starts its processes lazily
        pool.starmap(_throughput_client, [(url, 100 + i) for i in range(QUEUE_CLIENTS)])
        cpu0 = redis_cpu(store.r)
        start = time.perf_counter()
        make_job(store, requests)
        submit_s = time.perf_counter() - start
        served = sum(pool.starmap(_throughput_client, [(url, i) for i in range(QUEUE_CLIENTS)]))
        drain_s = time.perf_counter() - start - submit_s
    cpu = redis_cpu(store.r) - cpu0
    assert served == requests, served
    rate = requests / (submit_s + drain_s)
    return {
        "requests": requests,
        "clients": QUEUE_CLIENTS,
        "submit_s": submit_s,
        "drain_s": drain_s,
        "queue_requests_per_s": rate,
        "redis_cpu_us_per_request": cpu / requests * 1e6,
        "redis_cpu_fraction": cpu / (submit_s + drain_s),
        "redis_bound_requests_per_s": requests / cpu if cpu > 0 else None,
        "target": QUEUE_TARGET,
        "meets_target": rate >= QUEUE_TARGET,
    }


def plot_scale(report: dict[str, Any], path: Path) -> None:
    rounds = report["scaling"]["rounds"]
    workers = [r["workers"] for r in rounds]
    rates = [r["requests_per_s"] for r in rounds]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(workers, rates, "o-", color="tab:green", label="measured")
    left.plot(workers, [rates[0] * n for n in workers], "--", color="tab:gray", label="linear")
    left.set(
        xlabel="simulated workers (H100, 8B profile)",
        ylabel="offline requests/s",
        xscale="log",
        yscale="log",
        title="offline throughput vs workers",
    )
    left.set_xticks(workers, [str(n) for n in workers])
    left.minorticks_off()
    left.legend()
    efficiency = [r / (n * rates[0]) for r, n in zip(rates, workers)]
    right.plot(workers, efficiency, "o-", color="tab:green", label="scaling efficiency")
    busy = [r["device_busy_fraction"] for r in rounds]
    right.plot(workers, busy, "d-", color="tab:purple", label="simulated GPU busy")
    right.plot(
        workers,
        [r["worker_cpu_fraction"] for r in rounds],
        "s:",
        color="tab:blue",
        label="CPU per worker (cores)",
    )
    right.plot(
        workers, [r["redis_cpu_fraction"] for r in rounds], "^:", color="tab:red", label="Redis CPU (cores)"
    )
    right.axhline(EFFICIENCY_TARGET, color="tab:gray", linestyle="--", linewidth=1)
    right.set(xlabel="simulated workers", ylim=(0, 1.1), title="efficiency and CPU")
    right.set_xscale("log")
    right.set_xticks(workers, [str(n) for n in workers])
    right.minorticks_off()
    right.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def measure_controller(url: str, counts: list[int], window_s: float) -> dict[str, Any]:
    with local_ray():
        fleets = [measure_fleet(url, n, window_s) for n in counts]
    top = fleets[-1]
    return {
        "fleets": fleets,
        "controller_cpu_fraction_1000": top["controller_cpu_fraction"],
        "target": CPU_TARGET,
        "meets_target": top["controller_cpu_fraction"] <= CPU_TARGET,
    }


def plot_controller(report: dict[str, Any], path: Path) -> None:
    fleets = report["controller"]["fleets"]
    workers = [f["workers"] for f in fleets]
    fig, ax = plt.subplots(figsize=(6, 4))
    controller = [f["controller_cpu_fraction"] for f in fleets]
    reporters = [f["reporter_cpu_fraction"] for f in fleets]
    ax.plot(workers, controller, "o-", color="tab:red", label="controller")
    ax.plot(workers, reporters, "s:", color="tab:blue", label="fake reporters")
    ax.axhline(CPU_TARGET, color="tab:gray", linestyle="--", linewidth=1, label="target")
    ax.set(xlabel="simulated workers", ylabel="CPU (cores)", xscale="log", title="controller CPU")
    ax.set_xticks(workers, [str(n) for n in workers])
    ax.minorticks_off()
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(quick: bool, out: Path) -> dict[str, Any]:
    from harvest.models.tiny import make_tiny

    counts = [1, 2, 4, 8] if quick else [1, 2, 4, 8, 16]
    with tempfile.TemporaryDirectory() as tmp, private_redis(Path(tmp)) as url:
        # the tiny model's directory gives the simulated engine its config and tokenizer
        model = make_tiny(Path(tmp) / "tiny-llama", "llama")
        with console.status(f"offline throughput of {counts} simulated workers..."):
            scaling = measure_scaling(model, url, counts, repeats=2 if quick else 3)
        with console.status("one Redis, null engine..."):
            queue = measure_queue(url, 10_000 if quick else 60_000)
        fleet_sizes = [1000] if quick else [100, 300, 1000]
        with console.status(f"the controller under {fleet_sizes} fake workers..."):
            controller = measure_controller(url, fleet_sizes, 20.0 if quick else 30.0)
    report = {"quick": quick, "scaling": scaling, "queue": queue, "controller": controller}
    plot_scale(report, out / "scale.png")
    if not quick:
        plot_controller(report, out / "scale-controller.png")
    write_result(out, "scale", report)
    one = scaling["rounds"][0]["requests_per_s"]
    rows = [
        [
            r["workers"],
            r["requests_per_s"],
            r["tokens_per_s"],
            r["requests_per_s"] / (r["workers"] * one),
            r["device_busy_fraction"],
            r["step_overrun"],
            r["worker_cpu_fraction"],
            r["redis_cpu_fraction"],
        ]
        for r in scaling["rounds"]
    ]
    columns = [
        "workers",
        "requests/s",
        "tokens/s",
        "efficiency",
        "GPU busy",
        "step overrun",
        "CPU/worker",
        "Redis CPU",
    ]
    print_table("offline throughput, simulated H100 workers (best of the repeats)", columns, rows)
    print_table(
        "one Redis, null engine",
        ["measure", "value"],
        [
            ["queue requests/s (submit + drain)", queue["queue_requests_per_s"]],
            ["Redis CPU µs per request", queue["redis_cpu_us_per_request"]],
            ["requests/s Redis's CPU allows", queue["redis_bound_requests_per_s"] or 0.0],
        ],
    )
    print_table(
        "the controller under fake workers",
        ["workers", "period s", "heartbeats/s", "ctrl CPU", "µs/heartbeat", "RTT P50 ms", "RTT P99 ms",
         "reporters CPU", "oldest entry s"],
        [
            [f["workers"], f["heartbeat_period_s"], f["heartbeats_per_s"], f["controller_cpu_fraction"],
             f["controller_cpu_us_per_heartbeat"], f["heartbeat_rtt_p50_ms"], f["heartbeat_rtt_p99_ms"],
             f["reporter_cpu_fraction"], f["staleness_max_s"] or 0.0]
            for f in controller["fleets"]
        ],
    )  # fmt: skip
    verdict = "meets" if scaling["meets_target"] else "misses"
    console.print(
        f"scaling efficiency at {scaling['max_workers']} workers: "
        f"{scaling['scaling_efficiency']:.2f} ({verdict} the {EFFICIENCY_TARGET} target)"
    )
    return report
