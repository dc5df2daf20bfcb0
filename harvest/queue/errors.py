"""Exceptions the client, CLI and workers can tell apart."""

from __future__ import annotations

from typing import TYPE_CHECKING

from harvest.redact import redact_url

if TYPE_CHECKING:
    from harvest.queue.inputs import InputError


class QueueError(Exception):
    """Base class for queue errors."""


class JobNotFoundError(QueueError, KeyError):
    def __init__(self, job_id: str) -> None:
        super().__init__(job_id)
        self.job_id = job_id

    def __str__(self) -> str:
        return f"no such job: {self.job_id}"


class RedisUnavailableError(QueueError, ConnectionError):
    """No Redis at `url`; the URL is kept and shown with its password masked."""

    def __init__(self, url: str, cause: Exception) -> None:
        self.url = redact_url(url)
        super().__init__(f"cannot reach Redis at {self.url}: {cause}")


class InvalidInputError(QueueError, ValueError):
    """The input had bad lines and was rejected; `errors` names each line and reason."""

    def __init__(self, errors: list[InputError], num_errors: int | None = None, job_id: str | None = None):
        self.errors = errors
        self.num_errors = len(errors) if num_errors is None else num_errors
        self.job_id = job_id
        if self.num_errors == 1 and errors and errors[0].line == 0:  # the input as a whole
            super().__init__(f"invalid input: {errors[0]}")
            return
        shown = "\n".join(f"  {e}" for e in errors[:20])
        more = f"\n  ... and {self.num_errors - 20} more" if self.num_errors > 20 else ""
        super().__init__(f"{self.num_errors} invalid input line(s):\n{shown}{more}")


class JobNotQueuedError(QueueError):
    """The job left `validating` some other way than being queued (cancelled while it was being
    submitted, or failed by a sweep that took its submitter for dead); none of it is leasable."""

    def __init__(self, job_id: str, status: str, reason: str = "") -> None:
        self.job_id = job_id
        self.status = status
        why = f": {reason}" if reason else ""
        super().__init__(f"job {job_id} was {status} during submission{why}; nothing of it was queued")
