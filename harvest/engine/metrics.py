"""Per-step metrics and running totals, for the worker, the controller and the benchmarks."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from harvest.engine.request import Request
    from harvest.engine.scheduler import ScheduledBatch


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
    recomputed_tokens: int = 0  # tokens whose KV was lost to preemption and must be recomputed
    restored_tokens: int = 0  # tokens whose KV came back from a checkpoint
    checkpointed_blocks: int = 0
    prefix_queried_tokens: int = 0  # tokens of the requests admitted this step
    prefix_hit_tokens: int = 0  # of those, served by the prefix cache instead of computed
    aborted: bool = False  # abandoned at a layer boundary for an arriving online request

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def of(
        cls, batch: ScheduledBatch, running: list[Request], unfinished: list[Request], num_blocks: int,
        predicted_s: float, measured_s: float, restored: int, checkpointed: int, aborted: bool,
    ) -> StepMetrics:  # fmt: skip
        """The metrics of one step that ran `batch` (an aborted step computed nothing)."""
        online_tokens = sum(n for r, n in zip(batch.requests, batch.num_new_tokens) if r.is_online)
        online_running = sum(r.is_online for r in running)
        online_unfinished = sum(r.is_online for r in unfinished)
        return cls(
            time=time.monotonic(),
            online_running=online_running,
            offline_running=len(running) - online_running,
            online_waiting=online_unfinished - online_running,
            offline_waiting=(len(unfinished) - online_unfinished) - (len(running) - online_running),
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
            recomputed_tokens=batch.recomputed_tokens,
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

    def as_dict(self) -> dict:
        return {**asdict(self), "prefix_hit_rate": self.prefix_hit_rate}
