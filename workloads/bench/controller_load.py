"""The controller under a simulated fleet: `n` fake workers heartbeating at the production
interval (the period the controller answers with) into the real `HarvestController` actor.

The reporters are asyncio tasks inside a few Ray actors (`REPORTER_ACTORS`), each task one
worker: it waits the worker's period, then sends `heartbeat(worker_id, stats, handle)` with
a stats dict of a real worker's shape (`worker_stats`: the engine loop's snapshot with its
totals and latency histograms, plus the fields `GPUWorker.stats()` adds) and its actor's own
handle while the controller asks for it (once), as a real worker's heartbeat thread does.
Measured over a window after a warm-up: the controller process's CPU seconds / wall seconds
(psutil on its pid), the heartbeat round trip as the reporters saw it, the heartbeats the
controller got vs the nominal rate (the reporters must keep up, and their own CPU is
reported beside), and the staleness of its view: the age of the oldest worker entry in
`status()` at sampling times.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import psutil

REPORTER_ACTORS = 4
PERIOD_S = 0.25  # the production monitor period (`ServiceConfig.monitor_period_s`)
CPU_TARGET = 0.1  # of one core, at 1,000 workers
STATUS_EVERY_S = 2.0


def worker_stats(index: int) -> dict[str, Any]:
    """A heartbeat's stats as `GPUWorker.stats()` builds them, every histogram filled."""
    # imported here, not at the top: the controller loads this module to deserialize a
    # reporter's handle, and harvest.engine brings torch (a real worker's handle does not)
    from harvest.engine.metrics import LATENCIES, LATENCY_BUCKETS_S, EngineStats, StepMetrics

    totals = EngineStats(steps=120_000, online_tokens=2_000_000, offline_tokens=9_000_000).as_dict()
    buckets = len(LATENCY_BUCKETS_S) + 1
    for name in LATENCIES:
        totals["latency"][name] = {
            cls: {"counts": [(i * 37 + index) % 500 for i in range(buckets)], "sum": 1234.5}
            for cls in ("online", "offline")
        }
    step = StepMetrics(time=time.monotonic(), online_running=6, offline_running=40, kv_blocks_total=4096)
    return {
        "running": True,
        "healthy": True,
        "error": None,
        "loop_steps": 120_000,
        "last_step_age_s": 0.01,
        "pending_online": 6,
        "pending_offline": 40,
        "finished": {"online": 30_000, "offline": 90_000},
        "totals": totals,
        "last_step": step.as_dict(),
        "worker_id": f"sim-{index:04d}",
        "pid": 100_000 + index,
        "node_id": f"{index // 8:056x}",
        "actor_name": f"SERVE_REPLICA::harvest#HarvestWorker#{index:08x}",
        "offline_enabled": True,
        "offline_paused": None,
        "shards": [f"job-{index % 7}:{index % 50}", f"job-{index % 7}:{index % 50 + 50}"],
        "offline_inflight": 40,
        "kv_blocks_total": 4096,
        "kv_blocks_used": 3100,
        "max_model_len": 8192,
        "slo": {"ttft_s": 1.0, "tpot_s": 0.1},
        "slo_target": [1.0, 0.1],
        "slo_scale": 1.0,
        "capacity_tokens": 65_536,
        "gc_frozen_objects": 250_000,
        "uptime_s": 3600.0,
    }


class Reporters:
    """Fake workers `first..first+count-1`, one asyncio task each (a Ray actor)."""

    def __init__(self, controller: Any, first: int, count: int) -> None:
        self.controller = controller
        self.workers = [(f"sim-{i:04d}", worker_stats(i)) for i in range(first, first + count)]
        self.stopped = asyncio.Event()

    def pid(self) -> int:
        return os.getpid()

    async def run(self, period_s: float) -> dict[str, Any]:
        """Heartbeat until `stop()`: the (send time, round trip) of every call, and the errors."""
        import ray

        me = ray.get_runtime_context().current_actor
        calls: list[tuple[float, float]] = []
        errors = 0

        async def worker(slot: int, name: str, stats: dict[str, Any]) -> None:
            nonlocal errors
            await asyncio.sleep(period_s * slot / len(self.workers))  # phases spread, as in a fleet
            period, send_handle = period_s, True
            while not self.stopped.is_set():
                await asyncio.sleep(period)  # the heartbeat thread's `stop.wait(period_s)`
                stats["uptime_s"] += period
                stats["last_step"]["time"] = time.monotonic()
                now, sent = time.time(), time.perf_counter()
                try:
                    reply = await self.controller.heartbeat.remote(name, stats, me if send_handle else None)
                except Exception:  # counted: a fleet's heartbeats may fail
                    errors += 1
                    continue
                calls.append((now, time.perf_counter() - sent))
                # as the worker's heartbeat thread does
                period, send_handle = reply["period_s"], reply["send_handle"]

        await asyncio.gather(*(worker(i, n, s) for i, (n, s) in enumerate(self.workers)))
        return {"calls": calls, "errors": errors}

    async def stop(self) -> None:
        self.stopped.set()


def _cpu_s(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        t = psutil.Process(pid).cpu_times()
        total += t.user + t.system
    return total


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def measure_fleet(
    redis_url: str, workers: int, window_s: float, warmup_s: float = 4.0, on_start: Any = None
) -> dict[str, Any]:
    """One controller, `workers` fake reporters at `PERIOD_S`, measured for `window_s`;
    `on_start(controller_pid)`, if given, is called as the window opens (to attach a profiler)."""
    import ray

    from controller.controller import controller_actor

    controller = controller_actor().remote(
        {"redis_url": redis_url, "num_workers": workers, "monitor_period_s": PERIOD_S}
    )
    reporter_cls = ray.remote(num_cpus=0)(Reporters)
    per = -(-workers // REPORTER_ACTORS)
    reporters = [
        reporter_cls.remote(controller, first, min(per, workers - first)) for first in range(0, workers, per)
    ]
    try:
        controller_pid = ray.get(controller.__ray_call__.remote(lambda self: os.getpid()))
        reporter_pids = ray.get([r.pid.remote() for r in reporters])
        runs = [r.run.remote(PERIOD_S) for r in reporters]
        # every worker in the view once before the warm-up: one-time costs (the first handle
        # of each reporter actor loads its class) are not the steady state
        deadline = time.monotonic() + 120
        while len(ray.get(controller.status.remote())["workers"]) < workers:
            if time.monotonic() > deadline:
                raise RuntimeError("the controller never saw every fake worker")
            time.sleep(0.5)
        time.sleep(warmup_s)
        if on_start is not None:
            on_start(controller_pid)
        window = [time.time()]
        cpu0, rcpu0, wall0 = _cpu_s([controller_pid]), _cpu_s(reporter_pids), time.perf_counter()
        samples = []
        while time.perf_counter() - wall0 + STATUS_EVERY_S < window_s:
            time.sleep(STATUS_EVERY_S)
            status = ray.get(controller.status.remote())
            now = time.time()
            seen = [w["seen"] for w in status["workers"].values()]
            samples.append({"workers_in_view": len(seen), "oldest_age_s": now - min(seen) if seen else None})
        time.sleep(max(0.0, window_s - (time.perf_counter() - wall0)))
        cpu, wall = _cpu_s([controller_pid]) - cpu0, time.perf_counter() - wall0
        reporter_cpu = _cpu_s(reporter_pids) - rcpu0
        window.append(time.time())
        period = ray.get(controller.heartbeat_period.remote())
        ray.get([r.stop.remote() for r in reporters])
        done = ray.get(runs)
    finally:
        for actor in [*reporters, controller]:
            ray.kill(actor)
    rtts = [rtt for d in done for sent, rtt in d["calls"] if window[0] <= sent <= window[1]]
    ages = [s["oldest_age_s"] for s in samples if s["oldest_age_s"] is not None]
    return {
        "workers": workers,
        "monitor_period_s": PERIOD_S,
        "heartbeat_period_s": period,  # as the controller paces a fleet this size
        "window_s": wall,
        "controller_cpu_fraction": cpu / wall,
        "heartbeats_per_s": len(rtts) / wall,
        "nominal_heartbeats_per_s": workers / period,
        "controller_cpu_us_per_heartbeat": cpu / max(1, len(rtts)) * 1e6,
        "heartbeat_rtt_p50_ms": _quantile(rtts, 0.5) * 1e3,
        "heartbeat_rtt_p99_ms": _quantile(rtts, 0.99) * 1e3,
        "heartbeat_errors": sum(d["errors"] for d in done),
        "reporter_actors": len(reporters),
        "reporter_cpu_fraction": reporter_cpu / wall,
        "status_samples": samples,
        "view_complete": bool(samples) and all(s["workers_in_view"] == workers for s in samples),
        "staleness_max_s": max(ages) if ages else None,
        "staleness_p50_s": _quantile(ages, 0.5) if ages else None,
    }
