"""Pause: why a worker's offline side is waiting for Redis, and when it tries again.

A Redis failure of any kind (unreachable, READONLY after a failover, OOM, a script error)
pauses offline work; it never ends it. The worker retries with capped exponential
backoff for as long as it takes and logs the pause once when it starts and once per
change of cause, not at every retry.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import redis

BACKOFF_S = (0.1, 5.0)  # retries from 0.1 s apart, doubling, at most 5 s (or the caller's cap)


def describe_error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _unreachable(exc: BaseException) -> bool:
    return isinstance(exc, redis.ConnectionError | redis.TimeoutError)


@dataclass
class Pause:
    """The cause, since when (unix s), and the next try (monotonic)."""

    cause: str
    since: float
    unreachable: bool  # no connection (else Redis answered with an error: READONLY, OOM, ...)
    backoff_s: float = BACKOFF_S[0]
    retry_at: float = 0.0

    @classmethod
    def start(cls, exc: BaseException) -> Pause:
        pause = cls(describe_error(exc), time.time(), _unreachable(exc))
        pause.retry_at = time.monotonic() + pause.backoff_s
        return pause

    def failed_again(self, exc: BaseException, cap_s: float) -> bool:
        """Another try failed: back off further (at most `cap_s`); True if the cause changed."""
        cause = describe_error(exc)
        changed = cause != self.cause
        self.cause, self.unreachable = cause, _unreachable(exc)
        self.backoff_s = min(cap_s, BACKOFF_S[1], 2 * self.backoff_s)
        self.retry_at = time.monotonic() + self.backoff_s
        return changed

    @property
    def due(self) -> bool:
        return time.monotonic() >= self.retry_at

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.since))
        return f"Redis {'unreachable' if self.unreachable else 'failing'} since {when}: {self.cause}"
