"""Per-step metrics, per-request latencies and running totals, for the worker, the controller,
/metrics and the benchmarks."""

from __future__ import annotations

import threading
from bisect import bisect_left
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from harvest.engine.request import Request, RequestOutput
    from harvest.engine.scheduler import ScheduledBatch

# Upper bounds (seconds) of the latency histograms' buckets, shared by every worker so that
# Prometheus can sum their buckets. Dense below a second where SLO targets sit (a target
# is read off exactly when it is a bound), sparse up to the minutes an offline request takes.
LATENCY_BUCKETS_S: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75,
    1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)  # fmt: skip
LATENCIES = ("ttft_s", "tpot_s", "queue_s", "e2e_s")


@dataclass(frozen=True)
class RequestLatency:
    """A finished request's latencies, from the engine's own timestamps (`RequestOutput.metrics`).

    The one place TTFT and TPOT are computed: the engine's histograms (/metrics) use it, and
    any caller holding a request's last output (the worker's SLO feedback) can, so both
    measure the same thing. A field is None when the request never got that far (no
    token, or only one for TPOT; never scheduled for the queue time).
    """

    e2e_s: float  # arrival -> finish
    queue_s: float | None  # arrival -> first scheduled
    ttft_s: float | None  # arrival -> first token
    tpot_s: float | None  # first token -> finish, per further output token

    @classmethod
    def of(cls, out: RequestOutput) -> RequestLatency | None:
        """None for an output that is not a request's last, or one without timestamps."""
        m = out.metrics
        if not out.finished or "arrival_time" not in m or "finish_time" not in m:
            return None
        arrival, first_token = m["arrival_time"], m.get("first_token_time")
        scheduled = m.get("first_scheduled_time")
        tpot = None
        if first_token is not None and out.num_output_tokens > 1:
            tpot = (m["finish_time"] - first_token) / (out.num_output_tokens - 1)
        return cls(
            e2e_s=m["finish_time"] - arrival,
            queue_s=None if scheduled is None else scheduled - arrival,
            ttft_s=None if first_token is None else first_token - arrival,
            tpot_s=tpot,
        )


class LatencyHistograms:
    """Bucket counts of `RequestLatency` by latency and request class, kept as plain data.

    The engine observes on its own thread and `as_dict()` is read from others (the heartbeat,
    /metrics), hence the lock. Counts are per bucket (not cumulative); the last one is +Inf.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._data: dict[str, dict[str, dict[str, Any]]] = {name: {} for name in LATENCIES}

    def observe(self, request_class: str, latency: RequestLatency) -> None:
        with self._lock:
            for name in LATENCIES:
                value = getattr(latency, name)
                if value is None:
                    continue
                empty = {"counts": [0] * (len(LATENCY_BUCKETS_S) + 1), "sum": 0.0}
                hist = self._data[name].setdefault(request_class, empty)
                hist["counts"][bisect_left(LATENCY_BUCKETS_S, value)] += 1
                hist["sum"] += value

    def as_dict(self) -> dict[str, Any]:
        """{"bounds": [...], "ttft_s": {class: {"counts": [...], "sum": s}}, "tpot_s": ...}."""
        with self._lock:
            data = {
                name: {cls: {"counts": list(h["counts"]), "sum": h["sum"]} for cls, h in by_class.items()}
                for name, by_class in self._data.items()
            }
        return {"bounds": list(LATENCY_BUCKETS_S), **data}


@dataclass
class StepMetrics:
    time: float = 0.0  # monotonic time at the end of the step
    online_running: int = 0
    online_waiting: int = 0
    offline_running: int = 0
    offline_waiting: int = 0
    online_tokens: int = 0  # tokens computed this step, by class
    offline_tokens: int = 0
    kv_blocks_online: int = 0
    kv_blocks_offline: int = 0
    kv_blocks_total: int = 0
    offline_token_budget: int = 0  # offline tokens the scheduler could admit this step
    latency_budget_s: float | None = None  # None: no online work, offline runs at the best batch
    predicted_latency_s: float = 0.0
    measured_latency_s: float = 0.0
    preemptions: int = 0
    recomputed_tokens: int = 0  # tokens computed again after a preemption (not served by cache or checkpoint)
    restored_tokens: int = 0  # tokens whose KV came back from a checkpoint
    checkpointed_blocks: int = 0
    prefix_queried_tokens: int = 0  # tokens of the requests admitted this step
    prefix_hit_tokens: int = 0  # of those, served by the prefix cache instead of computed
    aborted: bool = False  # abandoned at a layer boundary for an arriving online request

    def as_dict(self) -> dict:
        return dict(vars(self))  # flat fields: asdict's deep copy costs a step ~0.1 ms

    @classmethod
    def of(
        cls, batch: ScheduledBatch, running: list[Request], waiting: tuple[int, int], num_blocks: int,
        predicted_s: float, measured_s: float, restored: int, checkpointed: int, aborted: bool, now: float,
    ) -> StepMetrics:  # fmt: skip
        """The metrics of one step that ran `batch` (an aborted step computed nothing)."""
        online_tokens = sum(n for r, n in zip(batch.requests, batch.num_new_tokens) if r.is_online)
        online_running = sum(r.is_online for r in running)
        return cls(
            time=now,
            online_running=online_running,
            offline_running=len(running) - online_running,
            online_waiting=waiting[0],
            offline_waiting=waiting[1],
            online_tokens=0 if aborted else online_tokens,
            offline_tokens=0 if aborted else batch.num_tokens - online_tokens,
            kv_blocks_online=sum(len(r.block_table) for r in running if r.is_online),
            kv_blocks_offline=sum(len(r.block_table) for r in running if not r.is_online),
            kv_blocks_total=num_blocks,
            offline_token_budget=batch.offline_token_budget,
            latency_budget_s=batch.latency_budget_s,
            predicted_latency_s=predicted_s,
            measured_latency_s=measured_s,
            preemptions=len(batch.preempted),
            recomputed_tokens=0 if aborted else batch.recomputed_tokens,
            restored_tokens=restored,
            checkpointed_blocks=checkpointed,
            prefix_queried_tokens=batch.prefix_queried_tokens,
            prefix_hit_tokens=batch.prefix_hit_tokens,
            aborted=aborted,
        )


@dataclass
class EngineStats:
    """Totals since the engine started."""

    steps: int = 0
    aborted_steps: int = 0
    online_tokens: int = 0
    offline_tokens: int = 0
    generated_online: int = 0
    generated_offline: int = 0
    preemptions: int = 0
    recomputed_tokens: int = 0
    restored_tokens: int = 0
    checkpointed_blocks: int = 0
    prefix_queried_tokens: int = 0
    prefix_hit_tokens: int = 0
    latency: LatencyHistograms = field(default_factory=LatencyHistograms, compare=False, repr=False)

    @property
    def prefix_hit_rate(self) -> float:
        """Share of admitted requests' tokens the prefix cache served."""
        return self.prefix_hit_tokens / self.prefix_queried_tokens if self.prefix_queried_tokens else 0.0

    def add(self, step: StepMetrics) -> None:
        self.steps += 1
        self.aborted_steps += step.aborted
        self.online_tokens += step.online_tokens
        self.offline_tokens += step.offline_tokens
        self.preemptions += step.preemptions
        self.recomputed_tokens += step.recomputed_tokens
        self.restored_tokens += step.restored_tokens
        self.checkpointed_blocks += step.checkpointed_blocks
        self.prefix_queried_tokens += step.prefix_queried_tokens
        self.prefix_hit_tokens += step.prefix_hit_tokens

    def observe_finished(self, request_class: str, out: RequestOutput) -> None:
        """A request's last output: its latencies go into the histograms."""
        if (latency := RequestLatency.of(out)) is not None:
            self.latency.observe(request_class, latency)

    def as_dict(self) -> dict:
        counts = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "latency"}
        return {**counts, "prefix_hit_rate": self.prefix_hit_rate, "latency": self.latency.as_dict()}
