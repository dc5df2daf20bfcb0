"""Engine-loop stats (`EngineLoop.stats()`) as Prometheus text exposition.

One function serves a single-process server (one loop) and the service, whose workers
render the stats of every worker (from the controller), labelled by worker. The stats are read at
scrape time, so nothing here keeps state of its own.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
CLASSES = ("online", "offline")
FINISH_REASONS = ("stop", "length", "abort", "error")

# (metric name, help, key in stats["totals"]) for class-less running totals
TOTALS = [
    ("harvest_engine_steps", "Engine steps run.", "steps"),
    ("harvest_engine_aborted_steps", "Offline-only steps abandoned for an arriving online request.",
     "aborted_steps"),
    ("harvest_engine_preemptions", "Requests preempted.", "preemptions"),
    ("harvest_engine_recomputed_tokens", "Tokens recomputed after preemption.", "recomputed_tokens"),
    ("harvest_engine_restored_tokens", "Tokens restored from KV checkpoints.", "restored_tokens"),
    ("harvest_engine_checkpointed_blocks", "KV blocks checkpointed.", "checkpointed_blocks"),
]  # fmt: skip


class _StatsCollector:
    def __init__(self, stats_by_replica: Mapping[str, Mapping[str, Any]]) -> None:
        self.stats_by_replica = stats_by_replica

    def collect(self) -> Iterator[Metric]:
        replicas = list(self.stats_by_replica.items())
        for name, doc, key in TOTALS:
            family = CounterMetricFamily(name, doc, labels=["replica"])
            for replica, stats in replicas:
                family.add_metric([replica], stats["totals"][key])
            yield family

        computed = CounterMetricFamily("harvest_engine_computed_tokens", "Tokens computed (prefill and "
                                       "decode), by request class.", labels=["replica", "class"])  # fmt: skip
        generated = CounterMetricFamily("harvest_engine_generated_tokens", "Tokens generated, by request "
                                        "class.", labels=["replica", "class"])  # fmt: skip
        running = GaugeMetricFamily("harvest_engine_running_requests", "Requests in the last step's "
                                    "running set.", labels=["replica", "class"])  # fmt: skip
        waiting = GaugeMetricFamily("harvest_engine_waiting_requests", "Requests waiting after the last "
                                    "step.", labels=["replica", "class"])  # fmt: skip
        pending = GaugeMetricFamily("harvest_engine_pending_requests", "Requests submitted through the "
                                    "loop and not yet finished.", labels=["replica", "class"])  # fmt: skip
        kv_blocks = GaugeMetricFamily("harvest_engine_kv_blocks_used", "KV cache blocks held by running "
                                      "requests.", labels=["replica", "class"])  # fmt: skip
        for replica, stats in replicas:
            totals, last = stats["totals"], stats["last_step"]
            for cls in CLASSES:
                computed.add_metric([replica, cls], totals[f"{cls}_tokens"])
                generated.add_metric([replica, cls], totals[f"generated_{cls}"])
                running.add_metric([replica, cls], last[f"{cls}_running"])
                waiting.add_metric([replica, cls], last[f"{cls}_waiting"])
                pending.add_metric([replica, cls], stats[f"pending_{cls}"])
                kv_blocks.add_metric([replica, cls], last[f"kv_blocks_{cls}"])
        yield from (computed, generated, running, waiting, pending, kv_blocks)

        finished = CounterMetricFamily("harvest_engine_requests_finished", "Requests finished, by reason.",
                                       labels=["replica", "reason"])  # fmt: skip
        for replica, stats in replicas:
            for reason in sorted({*FINISH_REASONS, *stats["finished"]}):
                finished.add_metric([replica, reason], stats["finished"].get(reason, 0))
        yield finished

        gauges = [
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
        ]  # fmt: skip
        for name, doc, value in gauges:
            family = GaugeMetricFamily(name, doc, labels=["replica"])
            for replica, stats in replicas:
                family.add_metric([replica], value(stats))
            yield family


def render_engine_metrics(stats_by_replica: Mapping[str, Mapping[str, Any]]) -> str:
    """Prometheus text (format 0.0.4) for replica name -> `EngineLoop.stats()`."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_StatsCollector(stats_by_replica))
    return generate_latest(registry).decode()
