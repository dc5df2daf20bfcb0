"""`harvest bench soak [--minutes N]`: steady load for a while, and whether memory stays flat.

One local service (one worker, as `harvest up` starts on this box) under steady online
load (two streaming clients at ~4 requests/s each) and back-to-back offline jobs of 100
requests. Every few seconds it samples the RSS of every process the run started (Ray's
GCS and raylet, Serve's controller and HAProxy, the worker replica, the harvest
controller, the checkpoint keeper, Redis, this driver), grouped by role, and Redis's used
memory and key count. After a warm-up it fits a line to each series and reports its
growth in % per hour of the value at the end of the warm-up. Target: no series grows more
than 5% per hour, and no online request fails.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import psutil

from harvest.local_redis import RedisProcess
from workloads.bench.common import console, local_ray, print_table, write_result
from workloads.bench.load import OnlineLoad

MODEL_NAME = "soak"
TARGET_GROWTH_PCT_PER_HOUR = 5.0

# process title (Ray sets `ray::Class.method` titles) or name -> the role it is reported under
ROLES = (
    ("gcs_server", "ray gcs_server"),
    ("raylet", "ray raylet"),
    ("haproxy", "serve haproxy"),
    ("ServeController", "serve controller"),
    ("ServeReplica", "harvest worker replica"),
    ("HarvestController", "harvest controller"),
    ("CheckpointKeeper", "checkpoint keeper"),
    ("ProxyActor", "serve proxy actor"),
    ("redis-server", "redis-server"),
    ("dashboard", "ray agents"),
    ("runtime_env", "ray agents"),
    ("log_monitor", "ray agents"),
    ("monitor.py", "ray agents"),
)


def role_of(proc: psutil.Process) -> str | None:
    try:
        title = " ".join(proc.cmdline()) or proc.name()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None
    for needle, role in ROLES:
        if needle in title:
            return role
    if title.startswith("ray::"):
        return "ray idle workers"
    return None


def sample_rss() -> dict[str, float]:
    """MiB of RSS per role, over this process and everything it started."""
    me = psutil.Process(os.getpid())
    rss: dict[str, float] = defaultdict(float)
    rss["bench driver"] = me.memory_info().rss / 2**20
    for proc in me.children(recursive=True):
        role = role_of(proc)
        if role is None:
            continue
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):  # it just exited
            rss[role] += proc.memory_info().rss / 2**20
    return dict(rss)


def growth_pct_per_hour(times: list[float], values: list[float]) -> float:
    """The least-squares slope of `values` over `times` (s), in % per hour of the first value."""
    n = len(times)
    if n < 3 or values[0] <= 0:
        return 0.0
    mean_t, mean_v = sum(times) / n, sum(values) / n
    var = sum((t - mean_t) ** 2 for t in times)
    if var == 0:
        return 0.0
    slope = sum((t - mean_t) * (v - mean_v) for t, v in zip(times, values)) / var
    return 100 * slope * 3600 / values[0]


class OfflineJobs:
    """Submits a job of `size` requests, waits for it, and submits the next, until stopped."""

    def __init__(self, redis_url: str, size: int, max_tokens: int) -> None:
        self.redis_url, self.size, self.max_tokens = redis_url, size, max_tokens
        self.completed_jobs = 0
        self.completed_requests = 0
        self.failed_requests = 0
        self.stop = threading.Event()

    def run(self) -> threading.Thread:
        thread = threading.Thread(target=self._loop, name="offline-jobs", daemon=True)
        thread.start()
        return thread

    def _loop(self) -> None:
        from harvest.client import HarvestClient

        client = HarvestClient(self.redis_url)
        n = 0
        while not self.stop.is_set():
            n += 1
            prompts = [
                f"job {n} ticket {i}: the bread was late and the soup was cold" for i in range(self.size)
            ]
            job = client.submit(
                prompts, model=MODEL_NAME, max_tokens=self.max_tokens, temperature=0, shard_size=16
            )
            while not self.stop.is_set():
                state = client.get(job.id)
                if state.status.is_terminal:
                    self.completed_jobs += state.status.value == "completed"
                    self.completed_requests += state.request_counts.completed
                    self.failed_requests += state.request_counts.failed
                    break
                time.sleep(0.5)
            if self.stop.is_set():
                client.cancel(job.id)


def _config(quick: bool, minutes: float | None) -> dict[str, Any]:
    minutes = minutes if minutes is not None else (2.0 if quick else 10.0)
    return {
        "minutes": minutes,
        "sample_s": 2.0 if minutes <= 3 else 5.0,
        # half the run, at most 10 minutes: the checkpoint keeper's closed-request set fills
        # for its first 5 minutes (CLOSED_TTL_S) and only then holds steady
        "warmup_s": min(600.0, 0.5 * 60 * minutes),
        "clients": 2,
        "rate_per_client": 4.0,
        "online_max_tokens": 16,
        "job_requests": 100,
        "job_max_tokens": 24,
        "job_ttl_s": 30.0,  # finished jobs expire within the run, so Redis can be flat
    }


def _start_service(model: Path, redis_url: str, cfg: dict[str, Any]) -> str:
    from workloads.bench.e2e import start_service

    return start_service(model, redis_url, model_name=MODEL_NAME, job_ttl_s=cfg["job_ttl_s"])


def _growth(samples: list[dict[str, Any]], warmup_s: float) -> dict[str, dict[str, float]]:
    steady = [s for s in samples if s["time"] >= warmup_s]
    series: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for s in steady:
        for role, mib in s["rss_mib"].items():
            series[f"rss {role}"].append((s["time"], mib))
        series["redis used memory"].append((s["time"], s["redis"]["used_memory"] / 2**20))
        series["redis keys"].append((s["time"], s["redis"]["keys"]))
        series["redis keys without a TTL"].append((s["time"], s["redis"]["keys_without_ttl"]))
        series["redis keys without a TTL, live jobs' aside"].append(
            (s["time"], s["redis"]["stray_keys_without_ttl"])
        )
    out = {}
    for name, points in series.items():
        times, values = [t for t, _ in points], [v for _, v in points]
        out[name] = {
            "start": values[0],
            "end": values[-1],
            "max": max(values),
            "growth_pct_per_hour": growth_pct_per_hour(times, values),
        }
    return out


# reported, not judged (see _judged)
UNJUDGED = ("redis keys", "redis keys without a TTL", "rss bench driver")


def _judged(growth: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """The series the target holds to: all but three.

    - Redis keys: most carry a TTL and expire by construction (a finished job's keys after
      the job TTL, the throughput buckets after 10 minutes), so their count follows the job
      rate times the TTL: a soak whose box gets faster (session 10's, once the tests sharing
      it stopped) shows them 'growing' with nothing leaking.
    - Redis keys without a TTL, all of them: a running job's keys get their TTL when it
      finishes, so this count swings with the jobs in flight at each sample (10 to 27 in
      session 12's 30 minutes, all of it in flight: no key pattern grew). A key that would
      pile up is one without a TTL outside a live job: that series is judged.
    - This driver: the load client, which keeps every request's latencies by design."""
    return {name: g for name, g in growth.items() if name not in UNJUDGED}


KeyPatterns = dict[str, dict[str, int]]


def _key_growth(start: KeyPatterns, end: KeyPatterns) -> KeyPatterns:
    """The key patterns with more keys at the end than at the warm-up: where Redis grows."""
    grew = {}
    for pattern, n in end.items():
        before = start.get(pattern, {}).get("keys", 0)
        if n["keys"] > before:
            grew[pattern] = {"at_warmup": before, "at_end": n["keys"], "no_ttl": n["no_ttl"]}
    return grew


def plot_memory(samples: list[dict[str, Any]], warmup_s: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s["time"] / 60 for s in samples]
    roles = sorted({r for s in samples for r in s["rss_mib"]})
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    colors = plt.get_cmap("tab20").colors
    for role, color in zip(roles, colors * 2):
        series = [s["rss_mib"].get(role, float("nan")) for s in samples]
        axes[0].plot(t, series, label=role, linewidth=1, color=color)
    axes[0].set_ylabel("RSS (MiB)")
    axes[0].set_title("RSS per process role")
    axes[0].legend(fontsize=7, ncol=2)
    axes[1].plot(
        t, [s["redis"]["used_memory"] / 2**20 for s in samples], color="tab:red", label="used memory"
    )
    axes[1].set_ylabel("Redis used memory (MiB)")
    keys = axes[1].twinx()
    keys.plot(t, [s["redis"]["keys"] for s in samples], color="tab:gray", linestyle="--", label="keys")
    keys.set_ylabel("Redis keys")
    axes[1].set_title("Redis")
    for ax in axes:
        ax.axvline(warmup_s / 60, color="black", linestyle=":", linewidth=1)
        ax.set_xlabel("time (min); dotted: end of warm-up")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(quick: bool, out: Path, minutes: float | None = None) -> dict:
    import transformers
    from rich.progress import Progress

    from harvest import service
    from harvest.models.tiny import make_tiny

    transformers.utils.logging.disable_progress_bar()
    cfg = _config(quick, minutes)
    samples: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="harvest-soak-") as tmp:
        model = make_tiny(Path(tmp) / "model", "llama", hidden=96, layers=3, heads=4)
        (Path(tmp) / "redis").mkdir()
        redis = RedisProcess(Path(tmp) / "redis")
        redis.start()
        try:
            with local_ray(num_cpus=max(4, os.cpu_count() or 1)):
                base = _start_service(model, redis.url, cfg)
                load = OnlineLoad(
                    base,
                    MODEL_NAME,
                    cfg["clients"],
                    cfg["online_max_tokens"],
                    rate_per_client=cfg["rate_per_client"],
                )
                jobs = OfflineJobs(redis.url, cfg["job_requests"], cfg["job_max_tokens"])
                threads = [load.run(), jobs.run()]
                duration = 60 * cfg["minutes"]
                t0 = time.monotonic()
                keys_at_warmup: KeyPatterns | None = None
                try:
                    with Progress(console=console, transient=True) as progress:
                        task = progress.add_task("soaking", total=duration)
                        while (now := time.monotonic() - t0) < duration:
                            samples.append(
                                {
                                    "time": now,
                                    "rss_mib": sample_rss(),
                                    "redis": redis.memory(),
                                    "online_requests": len(load.requests),
                                    "offline_jobs": jobs.completed_jobs,
                                }
                            )
                            progress.update(
                                task,
                                completed=now,
                                description=f"soaking: {len(load.requests)} online, "
                                f"{jobs.completed_jobs} jobs",
                            )
                            if keys_at_warmup is None and now >= cfg["warmup_s"]:
                                keys_at_warmup = redis.key_patterns()
                            time.sleep(cfg["sample_s"])
                    keys_at_end = redis.key_patterns()
                finally:
                    load.stop.set()
                    jobs.stop.set()
                    for thread in threads:
                        thread.join(timeout=60)
                    service.stop()
        finally:
            redis.stop()
    growth = _growth(samples, cfg["warmup_s"])
    key_growth = _key_growth(keys_at_warmup or {}, keys_at_end)
    online_failed = sum(r.end > 0 and not r.ok for r in load.requests)
    worst = max(_judged(growth).items(), key=lambda kv: kv[1]["growth_pct_per_hour"])
    result = {
        "config": {**cfg, "quick": quick},
        "online_requests": len(load.requests),
        "online_failed": online_failed,
        "offline_jobs_completed": jobs.completed_jobs,
        "offline_requests_completed": jobs.completed_requests,
        "offline_requests_failed": jobs.failed_requests,
        "growth": growth,
        "worst_series": worst[0],
        "target_met": online_failed == 0
        and all(g["growth_pct_per_hour"] <= TARGET_GROWTH_PCT_PER_HOUR for g in _judged(growth).values()),
        "samples": samples,
        "redis_keys": {"at_warmup": keys_at_warmup, "at_end": keys_at_end, "grew": key_growth},
    }
    print_table(
        f"soak: {cfg['minutes']:.0f} min, growth after a {cfg['warmup_s']:.0f} s warm-up",
        ["series", "start", "end", "max", "growth %/h"],
        [
            [name, g["start"], g["end"], g["max"], g["growth_pct_per_hour"]]
            for name, g in sorted(growth.items())
        ],
    )
    if key_growth:
        print_table(
            "Redis keys that grew after the warm-up (ids as *)",
            ["pattern", "at warm-up", "at end", "never expire"],
            [[p, g["at_warmup"], g["at_end"], g["no_ttl"]] for p, g in key_growth.items()],
        )
    verdict = "met" if result["target_met"] else "MISSED"
    console.print(
        f"online: {len(load.requests)} requests, {online_failed} failed; offline: {jobs.completed_jobs} "
        f"jobs, {jobs.completed_requests} requests; target {verdict} "
        f"(worst: {worst[0]}, {worst[1]['growth_pct_per_hour']:.1f} %/h)"
    )
    plot_memory(samples, cfg["warmup_s"], out / "soak_memory.png")
    write_result(out, "soak", result)
    return result
