"""Statistics every benchmark reports the same way."""

from __future__ import annotations


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank `q`th percentile of `values` (NaN when there are none)."""
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


LATENCY_KEYS = ("ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "tpot_p99_s")


def latency_percentiles(ttft: list[float], tpot: list[float]) -> dict[str, float]:
    """P50 and P99 of TTFT and TPOT (seconds), under `LATENCY_KEYS`."""
    return {
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p99_s": percentile(ttft, 99),
        "tpot_p50_s": percentile(tpot, 50),
        "tpot_p99_s": percentile(tpot, 99),
    }
