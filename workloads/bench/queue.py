"""`harvest bench queue`: what the Redis job queue costs per request, next to what Redis can do.

Four measurements against a private redis-server (AOF on, fsync every second):
  1. overhead per request of each queue verb (submit, lease, result write, ack) with
     instant fake results, so only the queue is timed;
  2. the most requests/s one Redis sustains with the worker access pattern (lease a shard,
     write results in step-sized groups plus progress, ack), from several client processes,
     and the ceiling implied by Redis's own CPU time per request;
  3. `redis-benchmark` on the same server (SET/GET/LPUSH/LPOP) for scale;
  4. the tiny model through the real local worker: engine time vs queue time per request.
     Target: the queue costs under 2% of a request's engine time.
"""

from __future__ import annotations

import json
import multiprocessing
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import redis
from rich.console import Console
from rich.table import Table

from harvest.local_redis import private_redis
from harvest.queue import JobOptions, JobStore, Progress, Result, WorkerConfig, run_local
from harvest.queue.inputs import read_items
from harvest.queue.submit import submit
from workloads.bench import common
from workloads.bench.plots import plot_queue

STEP_GROUP = 8  # results written together, as when several requests finish in one engine step
TARGET_FRACTION = 0.02
REPEATS = 3


def make_job(
    store: JobStore, n: int, shard_size: int = 64, defaults: dict | None = None, words: int = 20
) -> str:
    opts = JobOptions(shard_size=shard_size, defaults=defaults or {"max_tokens": 16, "temperature": 0})
    prompts = [f"Summarise document {i}: " + "lorem ipsum " * words for i in range(n)]
    return submit(store, lambda: read_items(prompts, opts.defaults), opts)


def drain_fake(store: JobStore, worker: str) -> tuple[int, dict[str, float]]:
    """The worker access pattern with instant results; returns (requests, seconds per verb)."""
    seconds = {"lease": 0.0, "write": 0.0, "ack": 0.0}
    done = 0
    while True:
        t0 = time.perf_counter()
        leases = store.lease(worker, 30)
        seconds["lease"] += time.perf_counter() - t0
        if not leases:
            return done, seconds
        lease = leases[0]
        n = len(lease.requests)
        t0 = time.perf_counter()
        for start in range(0, n, STEP_GROUP):
            group = range(start, min(n, start + STEP_GROUP))
            running = range(start + STEP_GROUP, min(n, start + 2 * STEP_GROUP))  # one save per request
            with store.r.pipeline(transaction=False) as pipe:
                store.write_results(
                    lease, {i: Result("completed", "x" * 64, list(range(16))) for i in group}, pipe
                )
                store.save_progress(lease, {i: Progress(list(range(8))) for i in running}, pipe)
                pipe.execute()
        seconds["write"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        assert store.ack(lease) == "ok"
        seconds["ack"] += time.perf_counter() - t0
        done += n


def _throughput_client(url: str, index: int) -> int:
    return drain_fake(JobStore.from_url(url), f"bench-{index}")[0]


def redis_cpu(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def measure_queue(url: str, quick: bool) -> dict[str, Any]:
    store = JobStore.from_url(url)
    make_job(store, 64)  # warm-up: imports, script loading (once per worker, not per request)
    drain_fake(store, "warm-up")
    n = 2_000 if quick else 20_000
    t0 = time.perf_counter()
    make_job(store, n)
    enqueue_s = time.perf_counter() - t0
    done, seconds = drain_fake(store, "bench")
    assert done == n
    per_request = {"enqueue_us": enqueue_s / n * 1e6, **{f"{k}_us": v / n * 1e6 for k, v in seconds.items()}}
    per_request["total_us"] = sum(per_request.values())

    clients = 4
    n_tp = 8_000 if quick else 60_000
    make_job(store, n_tp)
    cpu0, t0 = redis_cpu(store.r), time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(clients) as pool:
        served = sum(pool.starmap(_throughput_client, [(url, i) for i in range(clients)]))
    wall, cpu = time.perf_counter() - t0, redis_cpu(store.r) - cpu0
    assert served == n_tp
    return {
        "requests": n,
        "per_request": per_request,
        "throughput": {
            "clients": clients,
            "requests": n_tp,
            "requests_per_s": n_tp / wall,
            "redis_cpu_us_per_request": cpu / n_tp * 1e6,
            "redis_bound_requests_per_s": n_tp / cpu if cpu > 0 else None,
        },
    }


def redis_benchmark(url: str, quick: bool) -> dict[str, Any]:
    binary = shutil.which("redis-benchmark")
    if binary is None:
        return {"skipped": "redis-benchmark not found on PATH"}
    port = url.rsplit(":", 1)[1].split("/")[0]
    n = 50_000 if quick else 200_000
    args = [binary, "-p", port, "-n", str(n), "-c", "50", "-t", "set,get,lpush,lpop", "--csv"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300)
    rates = {}
    for line in proc.stdout.splitlines():
        cells = [c.strip('"') for c in line.split(",")]
        if len(cells) >= 2 and cells[0] != "test":
            rates[cells[0]] = float(cells[1])
    return {"requests_per_s": rates, "clients": 50, "requests": n}


def engine_alone(engine: Any, n: int, defaults: dict[str, Any]) -> float:
    """Seconds the engine takes for the bench's requests with no queue at all (the reference)."""
    from harvest.engine import SamplingParams

    prompts = [f"Summarise document {i}: " + "lorem ipsum " * 5 for i in range(n)]
    start = time.perf_counter()
    for i, prompt in enumerate(prompts):  # tokenized in the clock: the worker does that too
        ids = engine.tokenizer.encode(prompt)
        engine.add_request(ids, SamplingParams(**defaults), request_id=f"alone-{i}", request_class="offline")
    while engine.has_unfinished():
        engine.step()
    return time.perf_counter() - start


def measure_engine(url: str, quick: bool, workdir: Path) -> dict[str, Any]:
    """Engine vs queue time per request through the real local worker, at two request lengths."""
    from harvest.engine import Engine
    from harvest.models.tiny import make_tiny

    model = make_tiny(workdir / "tiny-llama", "llama")
    # the defaults a deployment starts from: 64 sequences per step, 64 requests per shard
    engine = Engine.from_pretrained(str(model), profile_latency=False)
    store = JobStore.from_url(url)
    config = WorkerConfig(idle_poll_s=0.02)
    make_job(store, 64, words=5)  # warm-up: the engine's first steps, script loading
    run_local(store, engine, config, exit_when_idle=True)
    n = 512 if quick else 2048
    runs = {}
    for max_tokens in (16,) if quick else (16, 64):
        defaults = {"max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
        samples = []
        for _ in range(REPEATS):  # alternating, side by side: the wall ratio is noisy on 2 cores
            alone_s = engine_alone(engine, n, defaults)
            t0 = time.perf_counter()
            make_job(store, n, defaults=defaults, words=5)  # ~20-token prompts
            enqueue_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            stats = run_local(store, engine, config, exit_when_idle=True).stats
            worker_s = stats.last_result_at - t0  # not the idle poll that ends the run
            samples.append((worker_s / alone_s - 1, alone_s, worker_s, enqueue_s, stats))
        wall_overhead, alone_s, worker_s, enqueue_s, stats = sorted(samples, key=lambda x: x[0])[REPEATS // 2]
        engine_us = stats.engine_s / n * 1e6
        loop_us = stats.loop_s / n * 1e6
        enqueue_us = enqueue_s / n * 1e6
        runs[f"max_tokens_{max_tokens}"] = {
            "requests": n,
            "max_tokens": max_tokens,
            "engine_us_per_request": engine_us,
            # what the engine loop itself spends on the queue (routing outputs to shards)
            "loop_queue_us_per_request": loop_us,
            # Redis traffic on the worker's I/O thread, overlapped with engine steps
            "io_thread_us_per_request": stats.queue_s / n * 1e6,
            "enqueue_us_per_request": enqueue_us,
            "queue_fraction": (loop_us + enqueue_us) / engine_us,
            "meets_target": (loop_us + enqueue_us) / engine_us <= TARGET_FRACTION,
            # the whole worker (queue, I/O thread) until its last result vs the engine alone,
            # the median of REPEATS alternating pairs (the other fields are from that pair)
            "engine_alone_s": alone_s,
            "worker_wall_s": worker_s,
            "wall_overhead": wall_overhead,
            "wall_overhead_samples": sorted(x[0] for x in samples),
            "queue_seconds_by_verb": stats.seconds,
            "queue_calls_by_verb": stats.calls,
        }
    return {"target_fraction": TARGET_FRACTION, "runs": runs}


def machine_info() -> dict[str, Any]:
    """The suites' machine info, plus the Redis versions and whether the tree was dirty."""
    root = Path(__file__).resolve().parents[2]
    dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain"], capture_output=True, text=True)
    server = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.split()
    return {
        **common.machine_info(),
        "redis_server": next((w[2:] for w in server if w.startswith("v=")), "unknown"),
        "redis_py": redis.__version__,
        "git_commit": common.git_commit() or "unknown",
        "git_dirty": bool(dirty.stdout.strip()),
    }


def run(quick: bool, out: Path) -> dict:
    console = Console()
    with tempfile.TemporaryDirectory() as tmp, private_redis(Path(tmp)) as url:
        with console.status("queue verbs with fake results..."):
            queue = measure_queue(url, quick)
        with console.status("redis-benchmark..."):
            bench = redis_benchmark(url, quick)
        with console.status("tiny model through the local worker..."):
            engine = measure_engine(url, quick, Path(tmp))
    report = {
        "suite": "queue",
        "quick": quick,
        "machine": machine_info(),
        "queue": queue,
        "redis_benchmark": bench,
        "engine": engine,
    }
    (out / "queue.json").write_text(json.dumps(report, indent=2))
    plot_queue(report, out / "queue.png")
    print_table(console, report)
    return report


def print_table(console: Console, report: dict) -> None:
    q, e, b = report["queue"], report["engine"], report["redis_benchmark"]
    table = Table("measure", "value", title="harvest queue overhead")
    for verb in ("enqueue", "lease", "write", "ack", "total"):
        table.add_row(f"{verb} per request", f"{q['per_request'][f'{verb}_us']:.1f} µs")
    tp = q["throughput"]
    table.add_row(f"queue requests/s ({tp['clients']} clients)", f"{tp['requests_per_s']:,.0f}")
    table.add_row("Redis CPU per request", f"{tp['redis_cpu_us_per_request']:.1f} µs")
    if tp["redis_bound_requests_per_s"]:
        table.add_row("queue requests/s Redis could serve", f"{tp['redis_bound_requests_per_s']:,.0f}")
    if "skipped" in b:
        table.add_row("redis-benchmark", f"skipped: {b['skipped']}")
    for name, rate in b.get("requests_per_s", {}).items():
        table.add_row(f"redis-benchmark {name}", f"{rate:,.0f} ops/s")
    for run in e["runs"].values():
        label = f"{run['max_tokens']}-token requests"
        table.add_row(f"engine time per request, {label}", f"{run['engine_us_per_request'] / 1e3:.2f} ms")
        table.add_row(f"enqueue time per request, {label}", f"{run['enqueue_us_per_request']:.1f} µs")
        table.add_row(
            f"engine-loop queue time per request, {label}", f"{run['loop_queue_us_per_request']:.1f} µs"
        )
        table.add_row(
            f"I/O-thread Redis time per request, {label}", f"{run['io_thread_us_per_request']:.1f} µs"
        )
        table.add_row(f"worker wall vs engine alone, {label}", f"{run['wall_overhead']:+.1%}")
        verdict = "[green]meets[/]" if run["meets_target"] else "[red]misses[/]"
        table.add_row(
            f"queue / engine time, {label}", f"{run['queue_fraction']:.2%} ({verdict} the 2% target)"
        )
    console.print(table)
