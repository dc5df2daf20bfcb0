"""The one Prometheus exporter: engine-loop stats (`EngineLoop.stats()`) as text exposition.

Every series is rendered at scrape time from plain data, so nothing here keeps state. A
one-process server renders its own loop's stats; in the service each worker's /metrics
renders every worker's stats (reported to the controller in its heartbeats) and the
controller's offline queue (jobs, tenants, depth by deadline), so one scrape through
HAProxy sees the fleet. Latency histograms travel as bucket counts inside each worker's
stats (engine/metrics.py) and are emitted per `worker` label with shared bounds: `sum by
(le)` over workers is the fleet's histogram. Every series is documented in docs/METRICS.md.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from itertools import accumulate
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
CLASSES = ("online", "offline")
FINISH_REASONS = ("stop", "length", "abort", "error")
Stats = Mapping[str, Any]

# name (without _total), help, key in stats["totals"]: running totals per worker
COUNTERS = [
    ("harvest_engine_steps", "Engine steps run.", "steps"),
    ("harvest_engine_aborted_steps", "Offline-only steps abandoned for an arriving online request.",
     "aborted_steps"),
    ("harvest_engine_preemptions", "Requests preempted (offline ones evicted for online work).",
     "preemptions"),
    ("harvest_engine_recomputed_tokens", "Tokens recomputed after preemption.", "recomputed_tokens"),
    ("harvest_engine_restored_tokens", "Tokens restored from KV checkpoints.", "restored_tokens"),
    ("harvest_engine_checkpointed_blocks", "KV blocks checkpointed.", "checkpointed_blocks"),
    ("harvest_engine_prefix_queried_tokens", "Prompt tokens of admitted requests looked up in the prefix "
     "cache.", "prefix_queried_tokens"),
    ("harvest_engine_prefix_hit_tokens", "Of those, tokens served by the prefix cache.", "prefix_hit_tokens"),
]  # fmt: skip

# name, help, kind, value of one class: per worker and request class
BY_CLASS: list[tuple[str, str, type[Metric], Callable[[Stats, str], float]]] = [
    ("harvest_engine_computed_tokens", "Tokens computed (prefill and decode), by class; the offline "
     "class is the harvested work.", CounterMetricFamily, lambda s, c: s["totals"][f"{c}_tokens"]),
    ("harvest_engine_generated_tokens", "Tokens generated, by class.", CounterMetricFamily,
     lambda s, c: s["totals"][f"generated_{c}"]),
    ("harvest_engine_running_requests", "Requests in the last step's running set.", GaugeMetricFamily,
     lambda s, c: s["last_step"][f"{c}_running"]),
    ("harvest_engine_waiting_requests", "Requests waiting after the last step.", GaugeMetricFamily,
     lambda s, c: s["last_step"][f"{c}_waiting"]),
    ("harvest_engine_pending_requests", "Requests submitted through the loop and not yet finished.",
     GaugeMetricFamily, lambda s, c: s[f"pending_{c}"]),
    ("harvest_engine_kv_blocks_used", "KV cache blocks held by running requests, by class.",
     GaugeMetricFamily, lambda s, c: s["last_step"][f"kv_blocks_{c}"]),
]  # fmt: skip

# name, help, value (None: the worker does not report it): per worker
GAUGES: list[tuple[str, str, Callable[[Stats], float | None]]] = [
    ("harvest_engine_kv_blocks_total", "KV cache blocks in the pool.",
     lambda s: s["last_step"]["kv_blocks_total"]),
    ("harvest_engine_step_latency_seconds", "Measured latency of the last step.",
     lambda s: s["last_step"]["measured_latency_s"]),
    ("harvest_engine_offline_token_budget", "Offline tokens the last step could admit.",
     lambda s: s["last_step"]["offline_token_budget"]),
    ("harvest_engine_last_step_age_seconds", "Seconds since the loop last made progress.",
     lambda s: s["last_step_age_s"]),
    ("harvest_engine_healthy", "1 if the engine loop is running and not stalled.",
     lambda s: float(s["healthy"])),
    ("harvest_slo_ttft_target_seconds", "The online TTFT target the controller set.",
     lambda s: s["slo_target"][0] if "slo_target" in s else None),
    ("harvest_slo_tpot_target_seconds", "The online TPOT target the controller set.",
     lambda s: s["slo_target"][1] if "slo_target" in s else None),
    ("harvest_worker_offline_enabled", "1 while the controller lets the worker lease offline shards.",
     lambda s: float(s["offline_enabled"]) if "offline_enabled" in s else None),
    ("harvest_worker_draining", "1 from the moment the worker starts draining until it leaves.",
     lambda s: float(s["draining"] is not None) if "draining" in s else None),
]  # fmt: skip

# name, help, key in stats["totals"]["latency"]: per worker and class
HISTOGRAMS = [
    ("harvest_request_ttft_seconds", "Time to first token: arrival at the engine to first token.", "ttft_s"),
    ("harvest_request_tpot_seconds", "Time per output token after the first.", "tpot_s"),
    ("harvest_request_queue_seconds", "Queue time: arrival at the engine to first scheduled.", "queue_s"),
    ("harvest_request_e2e_seconds", "End to end: arrival at the engine to finish, any reason.", "e2e_s"),
]


class _StatsCollector:
    def __init__(self, workers: Mapping[str, Stats], controller: Stats | None) -> None:
        self.workers = list(workers.items())
        self.controller = controller

    def collect(self) -> Iterator[Metric]:
        yield from self._worker_series()
        yield from self._histograms()
        if self.controller is not None:
            yield from self._controller_series(self.controller)

    def _worker_series(self) -> Iterator[Metric]:
        for name, doc, key in COUNTERS:
            family = CounterMetricFamily(name, doc, labels=["worker"])
            for worker, stats in self.workers:
                family.add_metric([worker], stats["totals"].get(key, 0))
            yield family
        for name, doc, kind, value in BY_CLASS:
            family = kind(name, doc, labels=["worker", "class"])
            for worker, stats in self.workers:
                for cls in CLASSES:
                    family.add_metric([worker, cls], value(stats, cls))
            yield family
        finished = CounterMetricFamily(
            "harvest_engine_requests_finished", "Requests finished, by reason.", labels=["worker", "reason"]
        )
        for worker, stats in self.workers:
            for reason in sorted({*FINISH_REASONS, *stats["finished"]}):
                finished.add_metric([worker, reason], stats["finished"].get(reason, 0))
        yield finished
        for name, doc, value in GAUGES:
            family = GaugeMetricFamily(name, doc, labels=["worker"])
            for worker, stats in self.workers:
                if (v := value(stats)) is not None:
                    family.add_metric([worker], v)
            yield family

    def _histograms(self) -> Iterator[Metric]:
        for name, doc, key in HISTOGRAMS:
            family = HistogramMetricFamily(name, doc, labels=["worker", "class"])
            for worker, stats in self.workers:
                latency = stats["totals"].get("latency", {})  # absent in a worker older than the exporter
                bounds = [*map(floatToGoString, latency.get("bounds", [])), "+Inf"]
                for cls in CLASSES:
                    hist = latency.get(key, {}).get(cls, {"counts": [0] * len(bounds), "sum": 0.0})
                    buckets = list(zip(bounds, accumulate(hist["counts"])))
                    family.add_metric([worker, cls], buckets, hist["sum"])
            yield family

    def _controller_series(self, controller: Stats) -> Iterator[Metric]:
        pending = controller.get("offline_requests_pending")
        if pending is not None:
            doc = "Offline requests not yet finished, over all jobs (the controller's count)."
            yield GaugeMetricFamily("harvest_offline_requests_pending", doc, value=pending)
        # the jobs the controller lists (the newest 20): a job leaves the scrape when it leaves
        # the list, so the series count stays bounded however many jobs the queue has seen
        doc = "Requests of a listed batch job (`batch`: its id), by state (total, completed, failed)."
        jobs = GaugeMetricFamily("harvest_job_requests", doc, labels=["batch", "state"])
        doc = "Prompt + completion tokens of a listed batch job's results: its harvested work."
        job_tokens = GaugeMetricFamily("harvest_job_harvested_tokens", doc, labels=["batch"])
        doc = "Engine time a listed batch job's results took (its share of each step, by tokens)."
        job_seconds = GaugeMetricFamily("harvest_job_device_seconds", doc, labels=["batch"])
        for job in controller.get("jobs", []):
            for state in ("total", "completed", "failed"):
                jobs.add_metric([job["id"], state], job["request_counts"][state])
            if "harvested_tokens" in job:  # absent from an older controller
                job_tokens.add_metric([job["id"]], job["harvested_tokens"])
            if "device_seconds" in job:
                job_seconds.add_metric([job["id"]], job["device_seconds"])
        yield jobs
        yield job_tokens
        yield job_seconds
        doc = "Unfinished requests of in-progress jobs, by how soon their completion window ends."
        queued = GaugeMetricFamily("harvest_offline_requests_queued", doc, labels=["due_within"])
        for due, n in controller.get("queued_by_deadline", {}).items():
            queued.add_metric([due], n)
        yield queued
        # tenants are the configured API keys' names (never the keys): a bounded label set
        doc = "Prompt + completion tokens of a tenant's batch results: its harvested work."
        harvested = CounterMetricFamily("harvest_tenant_harvested_tokens", doc, labels=["tenant"])
        doc = "A tenant's fair-share counter: tokens charged at lease (estimated), corrected by results."
        served = GaugeMetricFamily("harvest_tenant_served_tokens", doc, labels=["tenant"])
        doc = "Engine time a tenant's batch results took (their share of each step, by tokens)."
        seconds = CounterMetricFamily("harvest_tenant_device_seconds", doc, labels=["tenant"])
        for tenant, usage in controller.get("tenants", {}).items():
            harvested.add_metric([tenant], usage["harvested"])
            served.add_metric([tenant], usage["served"])
            seconds.add_metric([tenant], usage.get("device_seconds", 0.0))  # absent: an older controller
        yield harvested
        yield served
        yield seconds


def render_engine_metrics(workers: Mapping[str, Stats], controller: Stats | None = None) -> str:
    """Prometheus text (format 0.0.4) for worker name -> `EngineLoop.stats()` (with whatever
    the hosting worker adds), plus the controller's `status()` when there is one."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_StatsCollector(workers, controller))
    return generate_latest(registry).decode()
