"""Queue and worker settings: one dataclass each, validated on construction."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from harvest.paths import embedded_redis_password_file

EMBEDDED_REDIS_PORT = 6390  # not 6379: a system Redis often has that one


def embedded_redis_url(port: int = EMBEDDED_REDIS_PORT) -> str:
    """The embedded Redis's URL with the password its first start made (none before that)."""
    path = embedded_redis_password_file()
    password = path.read_text().strip() if path.exists() else ""
    return f"redis://{f':{password}@' if password else ''}127.0.0.1:{port}/0"


def default_redis_url() -> str:
    """$HARVEST_REDIS_URL, else the embedded Redis that `harvest up` starts locally."""
    return os.environ.get("HARVEST_REDIS_URL") or embedded_redis_url()


@dataclass
class JobOptions:
    """How a submitted job is queued (everything but its requests)."""

    name: str = ""
    model: str = ""
    owner: str = ""
    defaults: dict[str, Any] = field(default_factory=dict)  # sampling fields applied where a request has none
    metadata: dict[str, Any] = field(default_factory=dict)
    shard_size: int = 64
    max_attempts: int = 3  # leases a shard may use up (failures + expired leases) before it is dead
    completion_window_s: float | None = None  # None: never expires
    allow_invalid: bool = False  # submit the valid lines and skip bad ones instead of rejecting
    # identical prompts with deterministic sampling (greedy, or one explicit seed) are computed
    # once per shard and the result copied to each custom_id (marked deduplicated)
    dedup: bool = True
    # shards hold requests placed by prompt, not in input order: identical ones in one shard (for
    # dedup), those sharing a leading part side by side (queue/placement.py); results keep input order
    group_by_prompt: bool = True

    def __post_init__(self) -> None:
        if self.shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {self.shard_size}")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if self.completion_window_s is not None and self.completion_window_s <= 0:
            raise ValueError(f"completion_window_s must be > 0, got {self.completion_window_s}")


@dataclass
class WorkerConfig:
    """The offline side of a worker: how many shards it holds and how often it talks to Redis."""

    visibility_timeout_s: float = 30.0  # a lease not renewed for this long returns to the queue
    renew_interval_s: float | None = None  # None: a third of the visibility timeout
    progress_interval_s: float = 1.0  # bound on decode work lost to a crash, and on Redis writes
    result_flush_s: float = 0.05  # finished results wait this long to share one write (a shard's last: none)
    # lease more shards while fewer offline requests are in the engine; None: twice the engine's
    # max_num_seqs, so the next shard is already waiting when a batch finishes (no idle bubble)
    max_inflight_requests: int | None = None
    max_shards: int = 8
    idle_poll_s: float = 0.2  # wait between empty lease attempts

    def __post_init__(self) -> None:
        if self.visibility_timeout_s <= 0:
            raise ValueError("visibility_timeout_s must be > 0")
        if self.renew_interval_s is None:
            self.renew_interval_s = self.visibility_timeout_s / 3
        if not 0 < self.renew_interval_s < self.visibility_timeout_s:
            raise ValueError("renew_interval_s must be in (0, visibility_timeout_s)")
        if (self.max_inflight_requests is not None and self.max_inflight_requests < 1) or self.max_shards < 1:
            raise ValueError("max_inflight_requests and max_shards must be >= 1")
        if self.progress_interval_s <= 0 or self.idle_poll_s <= 0 or self.result_flush_s < 0:
            raise ValueError("progress_interval_s and idle_poll_s must be > 0, result_flush_s >= 0")
