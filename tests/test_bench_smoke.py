"""CI smoke runs of the benchmark suites: every field present, every number finite."""

from __future__ import annotations

import json
import math

from typer.testing import CliRunner

from harvest.cli import app

POLICY_FIELDS = (
    "ttft_p50_s",
    "ttft_p99_s",
    "tpot_p50_s",
    "tpot_p99_s",
    "slo_attainment",
    "online_tokens_per_s",
    "offline_tokens_per_s",
    "total_tokens_per_s",
    "preemptions",
    "recomputed_tokens",
)


def test_bench_coserve_quick(tmp_path):
    result = CliRunner().invoke(app, ["bench", "coserve", "--quick", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "coserve.json").read_text())
    assert data["slo"]["ttft_s"] > 0 and data["slo"]["tpot_s"] > 0
    assert math.isfinite(data["saturated_tokens_per_s"]) and data["saturated_tokens_per_s"] > 0
    assert set(data["policies"]) == {"online-only", "fcfs", "priority-recompute", "harvest"}
    for name, p in data["policies"].items():
        for field in POLICY_FIELDS:
            # a policy that finished no online request has no TPOT to report (fcfs behind a backlog)
            if field.startswith("tpot") and p["num_online_unfinished"] == p["num_online"]:
                continue
            assert math.isfinite(p[field]), (name, field)
    assert data["policies"]["online-only"]["offline_tokens_per_s"] == 0
    assert data["policies"]["harvest"]["offline_tokens_per_s"] > 0
    assert data["git_commit"] and data["machine"]["cpu_count"] >= 1
    for plot in ("coserve_latency_cdf.png", "coserve_throughput.png", "coserve_budget.png"):
        assert (tmp_path / plot).stat().st_size > 0
