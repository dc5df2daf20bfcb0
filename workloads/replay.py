"""Replay an online trace against an in-process engine while an offline backlog waits.

Online requests arrive from a feeder thread at their trace times (the engine's inbox is
thread-safe, so an arrival can cut an offline-only step short at a layer boundary, as it
would in the service); the calling thread runs the step loop until every online request
has finished. Everything is timed with the monotonic clock, or, for an engine on the
simulated device with a `VirtualClock`, in its virtual time: arrivals are then the clock's
events, fired while a step sleeps, and no thread is needed.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field

from harvest.engine import Engine, SamplingParams
from harvest.engine.clock import VirtualClock
from workloads.traces import Arrival


@dataclass
class OnlineResult:
    arrival_s: float
    ttft_s: float
    tpot_s: float | None  # mean time per output token after the first; None for one-token outputs
    output_tokens: int
    index: int = 0
    censored: bool = False  # unfinished when the run stopped: ttft_s is a lower bound


@dataclass
class ReplayRun:
    duration_s: float
    online: list[OnlineResult]
    online_tokens: int
    offline_tokens: int
    busy_s: float  # time spent inside engine steps
    timeline: list[dict] = field(default_factory=list)  # per-step metrics, time relative to start


def random_prompt(length: int, vocab: int, rng: random.Random) -> list[int]:
    return [rng.randrange(3, vocab) for _ in range(length)]


def replay(
    engine: Engine,
    arrivals: list[Arrival],
    backlog: list[tuple[list[int], int]],
    vocab: int,
    seed: int = 0,
    on_step=None,
    grace_s: float = 10.0,
    clock: VirtualClock | None = None,
) -> ReplayRun:
    """Run `arrivals` (online) with `backlog` (offline prompts, max tokens) queued at t=0.

    Stops when every online request has finished, or `grace_s` after the last arrival: a
    policy that starves online work (fcfs behind a backlog) would otherwise run until the
    whole backlog is done. Online requests still unfinished then are reported censored:
    their latencies are lower bounds measured at the stop. `clock`: the engine's, when it
    runs in virtual time.
    """
    rng = random.Random(seed)
    online_prompts = [random_prompt(a.prompt_tokens, vocab, rng) for a in arrivals]
    now = clock.now if clock is not None else time.monotonic
    start = now() + 0.01
    for i, (prompt, max_tokens) in enumerate(backlog):
        params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        engine.add_request(prompt, params, request_id=f"offline-{i}", arrival_time=start)
    wake = threading.Event()
    stop = threading.Event()

    def arrive(i: int) -> None:
        params = SamplingParams(max_tokens=arrivals[i].output_tokens, temperature=0, ignore_eos=True)
        engine.add_request(
            online_prompts[i],
            params,
            request_id=f"online-{i}",
            request_class="online",
            arrival_time=start + arrivals[i].time_s,
        )
        wake.set()

    def feed() -> None:
        for i, a in enumerate(arrivals):
            delay = start + a.time_s - time.monotonic()
            if delay > 0 and stop.wait(delay):
                return
            arrive(i)

    feeder = threading.Thread(target=feed, daemon=True)
    online: list[OnlineResult] = []
    timeline: list[dict] = []
    busy = 0.0
    stats_before = (engine.stats.generated_online, engine.stats.generated_offline)
    if clock is None:
        feeder.start()
    else:
        for i, a in enumerate(arrivals):
            clock.call_at(start + a.time_s, lambda i=i: arrive(i))
    try:
        stop_at = start + (arrivals[-1].time_s if arrivals else 0.0) + grace_s
        while len(online) < len(arrivals) and now() < stop_at:
            if not engine.has_unfinished():
                if clock is None:
                    wake.wait(0.05)
                    wake.clear()
                else:  # idle: straight to the next arrival
                    due = clock.next_event()
                    clock.advance_to(stop_at if due is None else due)
                continue
            t = now()
            outputs = engine.step()
            busy += now() - t
            timeline.append({**engine.last_step.as_dict(), "time": engine.last_step.time - start})
            if on_step is not None:
                on_step(len(online))
            for out in outputs:
                if out.finished and out.request_id.startswith("online-"):
                    online.append(_online_result(out, start, int(out.request_id.split("-")[1])))
    finally:
        stop.set()
        if clock is None:
            feeder.join()
    end = now()
    duration = end - start
    done = {r.index for r in online}
    for i, a in enumerate(arrivals):
        if i not in done:  # censored: never finished (and maybe never started) within the run
            online.append(OnlineResult(a.time_s, max(0.0, end - start - a.time_s), None, 0, i, censored=True))
    return ReplayRun(
        duration_s=duration,
        online=online,
        online_tokens=engine.stats.generated_online - stats_before[0],
        offline_tokens=engine.stats.generated_offline - stats_before[1],
        busy_s=busy,
        timeline=timeline,
    )


def _online_result(out, start: float, index: int) -> OnlineResult:
    m = out.metrics
    ttft = m["first_token_time"] - m["arrival_time"]
    n = out.num_output_tokens
    tpot = (m["finish_time"] - m["first_token_time"]) / (n - 1) if n > 1 else None
    return OnlineResult(m["arrival_time"] - start, ttft, tpot, n, index)
