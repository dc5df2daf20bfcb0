"""The offline job queue: a Redis job store, inputs, outputs and the worker's offline side."""

from harvest.queue.config import JobOptions, WorkerConfig, default_redis_url
from harvest.queue.errors import (
    InvalidInputError,
    JobNotFoundError,
    JobNotQueuedError,
    QueueError,
    RedisUnavailableError,
)
from harvest.queue.inputs import InputError, RequestSpec
from harvest.queue.models import Job, JobStatus, Lease, Progress, RequestCounts, Result, ShardState
from harvest.queue.outputs import ResultRow, iter_results
from harvest.queue.store import JobStore, connect
from harvest.queue.worker import OfflineWorker, run_local

__all__ = [
    "InputError",
    "InvalidInputError",
    "Job",
    "JobNotFoundError",
    "JobNotQueuedError",
    "JobOptions",
    "JobStatus",
    "JobStore",
    "Lease",
    "OfflineWorker",
    "Progress",
    "QueueError",
    "RedisUnavailableError",
    "RequestCounts",
    "RequestSpec",
    "Result",
    "ResultRow",
    "ShardState",
    "WorkerConfig",
    "connect",
    "default_redis_url",
    "iter_results",
    "run_local",
]
