"""A worker's metrics through Ray's metrics API (exported by Ray's Prometheus endpoint).

A worker's /metrics serves every worker's engine figures as text for one scrape target; these
series reach a cluster's Prometheus through Ray's own per-node export, tagged by worker
(the controller adds the offline queue depth).
"""

from __future__ import annotations

from ray.util.metrics import Counter, Gauge, Histogram

from harvest.engine import RequestClass, RequestOutput
from harvest.engine.metrics import StepMetrics

LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]


class WorkerMetrics:
    def __init__(self, worker_id: str) -> None:
        tags = ("worker",)
        self.tags = {"worker": worker_id}
        self.ttft = Histogram("harvest_ttft_seconds", "Online time to first token.", LATENCY_BUCKETS, tags)
        self.tpot = Histogram("harvest_tpot_seconds", "Online time per output token.", LATENCY_BUCKETS, tags)
        self.tokens = Counter("harvest_tokens_total", "Tokens computed, by class.", ("worker", "class"))
        self.preemptions = Counter("harvest_preemptions_total", "Offline sequences evicted.", tags)
        self.restored = Counter("harvest_restored_tokens_total", "Tokens restored from KV checkpoints.", tags)
        self.budget = Gauge("harvest_offline_token_budget", "Offline tokens the last step could admit.", tags)
        self.kv = Gauge("harvest_kv_blocks", "KV blocks in use, by class.", ("worker", "class"))

    def record_step(self, step: StepMetrics, outputs: list[RequestOutput]) -> None:
        tags = self.tags
        for cls, n in (("online", step.online_tokens), ("offline", step.offline_tokens)):
            if n:
                self.tokens.inc(n, {**tags, "class": cls})
        if step.preemptions:
            self.preemptions.inc(step.preemptions, tags)
        if step.restored_tokens:
            self.restored.inc(step.restored_tokens, tags)
        self.budget.set(step.offline_token_budget, tags)
        self.kv.set(step.kv_blocks_online, {**tags, "class": "online"})
        self.kv.set(step.kv_blocks_offline, {**tags, "class": "offline"})
        for out in outputs:
            m = out.metrics
            if out.finished and "first_token_time" in m and out.request_class is RequestClass.ONLINE:
                self.ttft.observe(m["first_token_time"] - m["arrival_time"], tags)
                if out.num_output_tokens > 1:
                    tpot = (m["finish_time"] - m["first_token_time"]) / (out.num_output_tokens - 1)
                    self.tpot.observe(tpot, tags)
