"""Records the queue stores: jobs, leases, per-request progress and results.

Redis holds flat strings; these dataclasses are the typed view. Timestamps are unix
seconds (floats) here and integer milliseconds of the Redis server clock in Redis, so
every lease and deadline is judged by one clock no matter which machine asks.
"""

from __future__ import annotations

import enum
import json
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson

from harvest.checkpoint.handle import CheckpointHandle


class JobStatus(str, enum.Enum):
    """The OpenAI Batch API life cycle."""

    VALIDATING = "validating"
    FAILED = "failed"  # rejected at validation; nothing was queued
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    EXPIRED = "expired"  # the completion window passed; finished results are kept
    CANCELLING = "cancelling"  # waiting for leased shards to come back
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset({JobStatus.FAILED, JobStatus.COMPLETED, JobStatus.EXPIRED, JobStatus.CANCELLED})


class ShardState(str, enum.Enum):
    READY = "ready"
    LEASED = "leased"
    DONE = "done"  # every request has a result
    DEAD = "dead"  # out of attempts; unfinished requests got error records
    CANCELLED = "cancelled"  # its job was cancelled or expired while it waited or ran


def _seconds(ms: str | None) -> float | None:
    return int(ms) / 1000 if ms else None


@dataclass
class RequestCounts:
    total: int = 0
    completed: int = 0
    failed: int = 0

    @property
    def finished(self) -> int:
        return self.completed + self.failed


@dataclass
class Job:
    """A batch job: its record in Redis plus derived counts."""

    id: str
    status: JobStatus
    name: str = ""
    model: str = ""
    owner: str = ""
    defaults: dict[str, Any] = field(default_factory=dict)  # sampling defaults for every request
    metadata: dict[str, Any] = field(default_factory=dict)
    request_counts: RequestCounts = field(default_factory=RequestCounts)
    num_shards: int = 0
    shards_finished: int = 0
    shard_size: int = 0
    max_attempts: int = 0
    leased: int = 0  # shards leased right now
    completion_window_s: float | None = None
    errors: list[dict[str, Any]] = field(default_factory=list)  # validation errors (first ones)
    num_errors: int = 0  # all validation errors, also those skipped with allow_invalid
    created_at: float | None = None
    in_progress_at: float | None = None
    expires_at: float | None = None
    finalizing_at: float | None = None
    completed_at: float | None = None
    failed_at: float | None = None
    expired_at: float | None = None
    cancelling_at: float | None = None
    cancelled_at: float | None = None

    @classmethod
    def from_hash(cls, h: dict[str, str]) -> Job:
        window = h.get("completion_window_ms")
        return cls(
            id=h["id"],
            status=JobStatus(h["status"]),
            name=h.get("name", ""),
            model=h.get("model", ""),
            owner=h.get("owner", ""),
            defaults=json.loads(h.get("defaults", "{}")),
            metadata=json.loads(h.get("metadata", "{}")),
            request_counts=RequestCounts(
                int(h.get("total", 0)), int(h.get("completed", 0)), int(h.get("failed", 0))
            ),
            num_shards=int(h.get("num_shards", 0)),
            shards_finished=int(h.get("shards_finished", 0)),
            shard_size=int(h.get("shard_size", 0)),
            max_attempts=int(h.get("max_attempts", 0)),
            leased=int(h.get("leased", 0)),
            completion_window_s=int(window) / 1000 if window and window != "0" else None,
            errors=json.loads(h.get("errors", "[]")),
            num_errors=int(h.get("num_errors", 0)),
            **{name: _seconds(h.get(name[:-3] + "_ms")) for name in _TIMES},
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view shaped like an OpenAI Batch object."""
        d = asdict(self)
        d["status"] = self.status.value
        d["object"] = "batch"
        return d


_TIMES = (
    "created_at", "in_progress_at", "expires_at", "finalizing_at", "completed_at",
    "failed_at", "expired_at", "cancelling_at", "cancelled_at",
)  # fmt: skip


@dataclass
class Progress:
    """How far one request got: generated ids so far and the KV checkpoint of their context.

    A resumed request feeds prompt + `token_ids` back as its prompt, so with greedy
    sampling its output is identical to an uninterrupted run; the checkpoint only saves
    recomputing that context.
    """

    token_ids: list[int] = field(default_factory=list)
    checkpoint: CheckpointHandle | None = None

    def to_json(self) -> bytes:
        checkpoint = self.checkpoint.to_dict() if self.checkpoint is not None else None
        return orjson.dumps({"token_ids": self.token_ids, "checkpoint": checkpoint})

    @classmethod
    def from_json(cls, s: str | bytes) -> Progress:
        d = orjson.loads(s)
        return cls(d.get("token_ids", []), _handle(d.get("checkpoint")))


def _handle(d: Any) -> CheckpointHandle | None:
    """A stored handle; anything else (a record from before handles were typed) resumes without one."""
    try:
        return CheckpointHandle.from_dict(d) if isinstance(d, dict) else None
    except ValueError:
        return None


@dataclass
class Lease:
    """One shard leased to one worker. `token` fences every write made under it."""

    job_id: str
    shard: int
    token: int
    attempt: int
    requests: list[dict[str, Any]]  # RequestSpec payloads, position = index in shard
    done: set[int] = field(default_factory=set)  # indices that already have a result
    progress: dict[int, Progress] = field(default_factory=dict)
    crashes: dict[int, int] = field(default_factory=dict)  # unfinished index -> crashed leases it was in

    @property
    def key(self) -> str:
        return f"{self.job_id}/{self.shard}"


@dataclass
class Result:
    """The one record each request ends with: a completion or an error."""

    status: str  # "completed" | "failed"
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    resumed_tokens: int = 0  # output tokens carried over from an earlier attempt
    started_at: float | None = None  # unix seconds
    finished_at: float | None = None
    ttft_s: float | None = None
    latency_s: float | None = None
    # the engine's step time spent on this attempt (engine.py `_update`); 0 for a copy
    device_seconds: float = 0.0
    worker: str = ""
    attempt: int = 0
    error_code: str | None = None
    error_message: str | None = None
    # a copy of an identical deterministic request's result in the same job (dedup): its usage
    # counts the tokens the answer stands for, though the engine computed them only once
    deduplicated: bool = False

    @classmethod
    def error(cls, code: str, message: str, **kwargs: Any) -> Result:
        return cls(status="failed", error_code=code, error_message=message, **kwargs)

    @property
    def ok(self) -> bool:
        return self.status == "completed"

    def to_json(self) -> bytes:
        # vars(), not asdict(): asdict deep-copies every field; orjson, not json: the stdlib
        # encoder costs ~9 us per result on the CPU box, a third of the queue's whole budget
        return orjson.dumps(vars(self))

    @classmethod
    def from_json(cls, s: str | bytes) -> Result:
        d = orjson.loads(s)
        # error records written by Lua (dead letters) nest the error like the OpenAI format
        if isinstance(d.get("error"), dict):
            err = d.pop("error")
            d["error_code"], d["error_message"] = err.get("code"), err.get("message")
        return cls(**{k: v for k, v in d.items() if k in _RESULT_FIELDS})


_RESULT_FIELDS = set(Result.__dataclass_fields__)
