"""Online traces: gamma arrivals with the asked-for rate and burstiness, BurstGPT/Azure replay."""

from __future__ import annotations

import random
from itertools import pairwise
from pathlib import Path

import pytest

from workloads.registry import DATA_DIR
from workloads.trace_replay import detect_trace_format, load_trace, write_azure_csv, write_burstgpt_csv
from workloads.traces import (
    Arrival,
    arrival_body,
    arrival_prompt,
    gamma_arrivals,
    interarrival_stats,
    scale_time,
)

BURSTGPT_ROWS = [
    # Timestamp, Model, Request tokens, Response tokens, Total tokens, Log Type (deliberately unsorted)
    "10,ChatGPT,300,50,350,Conversation log",
    "4,ChatGPT,100,20,120,Conversation log",
    "7,GPT-4,200,0,200,API log",  # a failure: no response tokens
    "12,ChatGPT,400,60,460,Conversation log",
    "20,GPT-4,500,70,570,API log",
    "31,ChatGPT,600,80,680,Conversation log",
]
AZURE_ROWS = [
    "2023-11-16 18:15:46.6805900,374,44",
    "2023-11-16 18:15:50.1805900,396,109",
    "2023-11-16 18:15:59.9305900,879,20",
    "2023-11-16 18:16:06.6805900,91,16",
    "2023-11-16 18:16:46.6805900,2000,250",
]


def write_lines(path: Path, header: str, rows: list[str]) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


@pytest.fixture
def burstgpt_csv(tmp_path: Path) -> Path:
    header = "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type"
    return write_lines(tmp_path / "burst.csv", header, BURSTGPT_ROWS)


@pytest.fixture
def azure_csv(tmp_path: Path) -> Path:
    return write_lines(tmp_path / "azure.csv", "TIMESTAMP,ContextTokens,GeneratedTokens", AZURE_ROWS)


# ---- generated traces ------------------------------------------------------------------------


@pytest.mark.parametrize("cv", [0.5, 1.0, 2.0, 4.0])
def test_gamma_trace_has_the_requested_rate_and_cv(cv: float):
    arrivals = gamma_arrivals(rate=5.0, cv=cv, num_requests=10_000, seed=0)
    rate, measured_cv = interarrival_stats(arrivals)
    assert len(arrivals) == 10_000
    assert rate == pytest.approx(5.0, rel=0.1)
    assert measured_cv == pytest.approx(cv, rel=0.1)
    assert arrivals[0].time_s == 0.0
    assert all(a.time_s <= b.time_s for a, b in pairwise(arrivals))


def test_gamma_trace_is_seeded_and_lengths_follow_their_distributions():
    a = gamma_arrivals(
        rate=2.0, cv=2.0, num_requests=2000, prompt_len="uniform:10:20", output_len="64", seed=7
    )
    assert a == gamma_arrivals(
        rate=2.0, cv=2.0, num_requests=2000, prompt_len="uniform:10:20", output_len="64", seed=7
    )
    assert a != gamma_arrivals(rate=2.0, cv=2.0, num_requests=2000, seed=8)
    assert {x.output_tokens for x in a} == {64}
    assert {x.prompt_tokens for x in a} == set(range(10, 21))
    # the length streams are separate, so changing them leaves the arrival times alone
    other_lengths = gamma_arrivals(rate=2.0, cv=2.0, num_requests=2000, seed=7)
    assert [x.time_s for x in other_lengths] == [x.time_s for x in a]


def test_gamma_trace_by_duration_and_cv_zero():
    timed = gamma_arrivals(rate=10.0, cv=1.0, duration_s=60.0, seed=3)
    assert timed[-1].time_s < 60.0
    assert len(timed) == pytest.approx(600, rel=0.15)
    steady = gamma_arrivals(rate=4.0, cv=0.0, num_requests=5)
    assert [a.time_s for a in steady] == [0.0, 0.25, 0.5, 0.75, 1.0]
    with pytest.raises(ValueError, match="exactly one"):
        gamma_arrivals(rate=1.0, num_requests=5, duration_s=5.0)
    with pytest.raises(ValueError, match="rate must be > 0"):
        gamma_arrivals(rate=0.0, num_requests=5)


def test_scale_time_and_prompts_for_replay():
    arrivals = [Arrival(0.0, 12, 5), Arrival(3.0, 40, 0)]
    assert [a.time_s for a in scale_time(arrivals, 3.0)] == [0.0, 1.0]
    with pytest.raises(ValueError):
        scale_time(arrivals, 0)
    rng = random.Random(0)
    assert len(arrival_prompt(arrivals[1], rng).split()) == 40
    body = arrival_body(arrivals[1], "tiny", rng)
    assert body["max_tokens"] == 1  # a logged failure (0 tokens) still asks for one
    assert len(body["prompt"].split()) == 40
    assert body["model"] == "tiny" and body["temperature"] == 0


# ---- replayed traces -------------------------------------------------------------------------


def test_format_is_detected_from_the_header(burstgpt_csv: Path, azure_csv: Path, tmp_path: Path):
    assert detect_trace_format(burstgpt_csv) == "burstgpt"
    assert detect_trace_format(azure_csv) == "azure"
    other = write_lines(tmp_path / "other.csv", "time,tokens", ["1,2"])
    with pytest.raises(ValueError, match="not a known trace format"):
        load_trace(other)


def test_burstgpt_replay_sorts_drops_failures_and_starts_at_zero(burstgpt_csv: Path):
    arrivals = load_trace(burstgpt_csv)
    assert arrivals == [
        Arrival(0.0, 100, 20),
        Arrival(6.0, 300, 50),
        Arrival(8.0, 400, 60),
        Arrival(16.0, 500, 70),
        Arrival(27.0, 600, 80),
    ]
    with_failures = load_trace(burstgpt_csv, drop_failed=False)
    assert Arrival(3.0, 200, 0) in with_failures and len(with_failures) == 6


def test_burstgpt_replay_scales_and_windows(burstgpt_csv: Path):
    fast = load_trace(burstgpt_csv, speedup=2.0)
    assert [a.time_s for a in fast] == [0.0, 3.0, 4.0, 8.0, 13.5]
    # trace seconds (from its first request at 4): 0, 6, 8, 16, 27; window [5, 17) keeps 6, 8, 16
    window = load_trace(burstgpt_csv, start_s=5.0, duration_s=12.0, speedup=2.0)
    assert [(a.time_s, a.prompt_tokens) for a in window] == [(0.0, 300), (1.0, 400), (5.0, 500)]
    assert len(load_trace(burstgpt_csv, start_s=5.0, limit=2)) == 2
    assert load_trace(burstgpt_csv, start_s=100.0) == []


def test_azure_replay_parses_timestamps_scales_and_windows(azure_csv: Path):
    arrivals = load_trace(azure_csv)
    assert [round(a.time_s, 6) for a in arrivals] == [0.0, 3.5, 13.25, 20.0, 60.0]
    assert arrivals[2] == Arrival(arrivals[2].time_s, 879, 20)
    window = load_trace(azure_csv, start_s=10.0, duration_s=15.0, speedup=10.0)
    assert [round(a.time_s, 6) for a in window] == [0.0, 0.675]
    assert [a.prompt_tokens for a in window] == [879, 91]


def test_azure_replay_with_utc_offsets(tmp_path: Path):
    rows = ["2024-05-10 00:00:00.0049830+00:00,10,1", "2024-05-10 00:00:02.5049830+00:00,20,2"]
    path = write_lines(tmp_path / "azure2024.csv", "TIMESTAMP,ContextTokens,GeneratedTokens", rows)
    assert [a.time_s for a in load_trace(path)] == [0.0, 2.5]


def test_written_traces_round_trip(tmp_path: Path):
    arrivals = gamma_arrivals(rate=3.0, cv=2.0, num_requests=50, seed=5)
    write_burstgpt_csv(arrivals, tmp_path / "b.csv")
    write_azure_csv(arrivals, tmp_path / "a.csv")
    for name in ("b.csv", "a.csv"):
        replayed = load_trace(tmp_path / name)
        assert [(a.prompt_tokens, a.output_tokens) for a in replayed] == [
            (a.prompt_tokens, a.output_tokens) for a in arrivals
        ]
        assert [a.time_s for a in replayed] == pytest.approx([a.time_s for a in arrivals], abs=1e-3)


def test_bundled_sample_trace_is_bursty():
    arrivals = load_trace(DATA_DIR / "burstgpt_sample.csv")
    rate, cv = interarrival_stats(arrivals)
    assert len(arrivals) == 300
    assert 0.5 < rate < 2.0
    assert cv > 2.0  # much burstier than Poisson
