"""Online arrival traces: when requests arrive and how long they are, generated or replayed.

Gamma-distributed inter-arrival times are the usual model of LLM serving traffic (BurstGPT,
AlpaServe): rate sets the mean, the coefficient of variation sets burstiness. cv=1 is Poisson;
cv>1 packs requests into bursts separated by long lulls, which is what stresses a scheduler that
shares GPUs between online and offline work.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

from workloads.lengths import LengthDist
from workloads.words import filler_text


@dataclass(frozen=True)
class Arrival:
    """One online request: when it arrives (seconds from the start of the trace) and its size."""

    time_s: float
    prompt_tokens: int
    output_tokens: int


def gamma_gaps(rate: float, cv: float, count: int, rng: random.Random) -> list[float]:
    """`count` inter-arrival times with mean 1/rate and coefficient of variation cv."""
    if rate <= 0:
        raise ValueError(f"rate must be > 0 requests/s, got {rate}")
    if cv < 0:
        raise ValueError(f"cv must be >= 0, got {cv}")
    if cv == 0:
        return [1.0 / rate] * count
    shape = 1.0 / cv**2
    scale = 1.0 / (rate * shape)
    return [rng.gammavariate(shape, scale) for _ in range(count)]


def gamma_arrivals(
    rate: float,
    cv: float = 1.0,
    num_requests: int | None = None,
    duration_s: float | None = None,
    prompt_len: str | LengthDist = "lognormal:512:1.0:4096",
    output_len: str | LengthDist = "lognormal:256:1.0:2048",
    seed: int = 0,
) -> list[Arrival]:
    """A seeded gamma-process trace of `num_requests` arrivals, or all arrivals before `duration_s`
    (give one of the two). The first request arrives at 0."""
    if (num_requests is None) == (duration_s is None):
        raise ValueError("give exactly one of num_requests and duration_s")
    prompt_dist, output_dist = LengthDist.parse(prompt_len), LengthDist.parse(output_len)
    # separate streams, so changing a length distribution does not move the arrival times
    time_rng, prompt_rng, output_rng = (
        random.Random(f"{seed}:{part}") for part in ("time", "prompt", "output")
    )
    arrivals: list[Arrival] = []
    now = 0.0
    while num_requests is None or len(arrivals) < num_requests:
        if duration_s is not None and now >= duration_s:
            break
        arrivals.append(Arrival(now, prompt_dist.sample(prompt_rng), output_dist.sample(output_rng)))
        now += gamma_gaps(rate, cv, 1, time_rng)[0]
    return arrivals


def interarrival_stats(arrivals: Sequence[Arrival]) -> tuple[float, float]:
    """(mean rate in requests/s, coefficient of variation of the inter-arrival times)."""
    if len(arrivals) < 3:
        raise ValueError("need at least 3 arrivals to estimate a rate and a cv")
    gaps = [b.time_s - a.time_s for a, b in pairwise(arrivals)]
    mean = statistics.fmean(gaps)
    return 1.0 / mean, statistics.pstdev(gaps) / mean


def scale_time(arrivals: Sequence[Arrival], speedup: float) -> list[Arrival]:
    """The same trace played `speedup` times faster (token counts unchanged)."""
    if not math.isfinite(speedup) or speedup <= 0:
        raise ValueError(f"speedup must be a positive number, got {speedup}")
    return [Arrival(a.time_s / speedup, a.prompt_tokens, a.output_tokens) for a in arrivals]


def arrival_prompt(arrival: Arrival, rng: random.Random) -> str:
    """A prompt of roughly `arrival.prompt_tokens` tokens, to replay the arrival against a server."""
    return filler_text(arrival.prompt_tokens, rng)


def arrival_body(arrival: Arrival, model: str, rng: random.Random) -> dict:
    """The /v1/completions body that replays one arrival: its prompt length and output budget."""
    prompt = arrival_prompt(arrival, rng)
    return {"model": model, "prompt": prompt, "max_tokens": max(1, arrival.output_tokens), "temperature": 0}
