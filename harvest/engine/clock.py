"""The engine's clock: the wall clock, or the simulated device's virtual time.

Every time the engine reads (arrivals, deadlines, step durations, the latency profile) comes
from one `Clock`. On a real device that is the monotonic wall clock. A simulation on a shared
box can run on `VirtualClock` instead: the simulated runner's sleeps advance it, so a step
takes exactly what the device profile says however busy the host is, the host's own
scheduling costs nothing, and a run costs CPU time, not wall time. Events (online arrivals)
fire at their virtual times while a step "sleeps", so an arrival can still cut an offline
step short at a layer boundary.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Callable
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float: ...

    def sleep(self, seconds: float) -> None: ...


class WallClock:
    """CLOCK_MONOTONIC (what time.monotonic and time.perf_counter read on Linux)."""

    def now(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


class VirtualClock:
    """Time that moves only when someone sleeps; `call_at` runs a function at a virtual time.

    Single-threaded by design: the thread that steps the engine is the only one that reads,
    sleeps or schedules (events run on it, in time order)."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = start
        self._events: list[tuple[float, int, Callable[[], None]]] = []
        self._order = itertools.count()

    def now(self) -> float:
        return self._now

    def sleep(self, seconds: float) -> None:
        self.advance_to(self._now + max(0.0, seconds))

    def call_at(self, when: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._events, (when, next(self._order), fn))

    def next_event(self) -> float | None:
        return self._events[0][0] if self._events else None

    def advance_to(self, when: float) -> None:
        """Move to `when`, running every event due by then at its own time."""
        while self._events and self._events[0][0] <= when:
            due, _, fn = heapq.heappop(self._events)
            self._now = max(self._now, due)
            fn()
        self._now = max(self._now, when)


WALL = WallClock()
