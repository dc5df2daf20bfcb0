"""Replaying real arrival traces from CSV: BurstGPT and the Azure LLM inference traces.

The format is recognised by the header. Times become seconds relative to the first request of the
chosen window, optionally compressed by a speed-up factor so an hour of production traffic can be
replayed in minutes against a small model.

    BurstGPT:  Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type
               (Timestamp in seconds from the start of the trace)
    Azure:     TIMESTAMP,ContextTokens,GeneratedTokens
               (TIMESTAMP a date-time string such as 2023-11-16 18:15:46.6805900)
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv

from workloads.traces import Arrival

# format -> (time column, prompt tokens column, output tokens column)
FORMATS: dict[str, tuple[str, str, str]] = {
    "burstgpt": ("Timestamp", "Request tokens", "Response tokens"),
    "azure": ("TIMESTAMP", "ContextTokens", "GeneratedTokens"),
}
BURSTGPT_HEADER = ("Timestamp", "Model", "Request tokens", "Response tokens", "Total tokens", "Log Type")


def detect_trace_format(path: str | Path) -> str:
    """'burstgpt' or 'azure', from the CSV header."""
    with open(path, newline="", encoding="utf-8") as f:
        header = next(csv.reader(f), [])
    names = {name.strip() for name in header}
    for fmt, columns in FORMATS.items():
        if set(columns) <= names:
            return fmt
    raise ValueError(
        f"{path}: not a known trace format (header {header}); expected BurstGPT columns "
        f"{', '.join(FORMATS['burstgpt'])} or Azure columns {', '.join(FORMATS['azure'])}"
    )


def trace_seconds(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """Seconds since the earliest entry, from numbers (BurstGPT) or date-time strings (Azure)."""
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        try:
            column = column.cast(pa.timestamp("ns"))
        except pa.ArrowInvalid:
            # strings with a UTC offset ("...+00:00") only cast to a zoned timestamp
            column = column.cast(pa.timestamp("ns", tz="UTC"))
    if pa.types.is_timestamp(column.type):
        nanos = pc.subtract(column, pc.min(column)).cast(pa.int64())
        return pc.divide(nanos.cast(pa.float64()), 1e9)
    seconds = column.cast(pa.float64())
    return pc.subtract(seconds, pc.min(seconds))


def load_trace(
    path: str | Path,
    speedup: float = 1.0,
    start_s: float = 0.0,
    duration_s: float | None = None,
    limit: int | None = None,
    drop_failed: bool = True,
) -> list[Arrival]:
    """Arrivals from a BurstGPT or Azure CSV trace, sorted by time.

    The window [start_s, start_s + duration_s) is in the trace's own seconds, counted from its first
    request; the kept arrivals are then shifted to start at 0 and divided by `speedup`.
    `drop_failed` skips requests that produced no tokens (BurstGPT logs failures as 0 response
    tokens). `limit` keeps the first N arrivals of the window.
    """
    if speedup <= 0:
        raise ValueError(f"speedup must be > 0, got {speedup}")
    time_col, prompt_col, output_col = FORMATS[detect_trace_format(path)]
    # only the three needed columns are parsed: production traces have millions of rows
    table = pa_csv.read_csv(
        path,
        convert_options=pa_csv.ConvertOptions(
            include_columns=[time_col, prompt_col, output_col],
            column_types={prompt_col: pa.int64(), output_col: pa.int64()},
        ),
    )
    table = pa.table(
        {"time_s": trace_seconds(table[time_col]), "prompt": table[prompt_col], "output": table[output_col]}
    )
    table = table.filter(pc.and_(pc.is_valid(table["prompt"]), pc.is_valid(table["output"])))
    if drop_failed:
        table = table.filter(pc.greater(table["output"], 0))
    keep = pc.greater_equal(table["time_s"], start_s)
    if duration_s is not None:
        keep = pc.and_(keep, pc.less(table["time_s"], start_s + duration_s))
    table = table.filter(keep).sort_by("time_s")
    if limit is not None:
        table = table.slice(0, limit)
    if table.num_rows == 0:
        return []
    first = table["time_s"][0].as_py()
    return [
        Arrival((t - first) / speedup, p, o)
        for t, p, o in zip(*(table[c].to_pylist() for c in ("time_s", "prompt", "output")), strict=True)
    ]


def write_burstgpt_csv(arrivals: Sequence[Arrival], path: str | Path, model: str = "ChatGPT") -> None:
    """Write arrivals in the BurstGPT layout (for sample traces and tests)."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(BURSTGPT_HEADER)
        for a in arrivals:
            total = a.prompt_tokens + a.output_tokens
            writer.writerow(
                [f"{a.time_s:.3f}", model, a.prompt_tokens, a.output_tokens, total, "Conversation log"]
            )


def write_azure_csv(
    arrivals: Sequence[Arrival], path: str | Path, start: str = "2023-11-16 18:00:00"
) -> None:
    """Write arrivals in the Azure LLM inference trace layout, from a start date-time."""
    base = datetime.fromisoformat(start)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(FORMATS["azure"])
        for a in arrivals:
            stamp = base + timedelta(seconds=a.time_s)
            # seven fractional digits, as in the published trace
            writer.writerow([stamp.strftime("%Y-%m-%d %H:%M:%S.%f") + "0", a.prompt_tokens, a.output_tokens])
