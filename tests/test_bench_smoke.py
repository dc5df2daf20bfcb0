"""CI smoke runs of the benchmark suites: every field present, every number finite."""

from __future__ import annotations

import importlib
import json
import math

import pytest
from typer.testing import CliRunner

from harvest.cli import app
from harvest.cli.bench import SUITES

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


@pytest.mark.parametrize("suite", sorted(SUITES))
def test_every_suite_module_imports_and_has_run(suite):
    """Cheap and always in CI: the slow-marked suites' quick runs are not, and a suite that
    no longer imports (a name moved in a merge) would otherwise go unseen."""
    assert callable(importlib.import_module(SUITES[suite]).run)


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
    timeline = json.loads((tmp_path / "coserve_timeline.json").read_text())
    for name, p in data["policies"].items():
        # every miss is listed, each past at least one of its targets, and found in the timeline
        assert len(p["misses"]) == round((1 - p["slo_attainment"]) * p["num_online"]), name
        for m in p["misses"]:
            assert m["censored"] or m["ttft_x"] > 1 or (m["tpot_x"] or 0) > 1, (name, m)
        assert timeline[name] and all("measured_latency_s" in step for step in timeline[name])
    assert data["git_commit"] and data["machine"]["cpu_count"] >= 1
    for plot in ("coserve_latency_cdf.png", "coserve_throughput.png", "coserve_budget.png"):
        assert (tmp_path / plot).stat().st_size > 0


def _finite(d: dict, keys: tuple[str, ...]) -> None:
    for key in keys:
        assert math.isfinite(d[key]), key


LATENCY = ("ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "tpot_p99_s")


def test_bench_e2e_quick(tmp_path):
    result = CliRunner().invoke(app, ["bench", "e2e", "--quick", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "e2e.json").read_text())
    _finite(data["online_alone"], LATENCY)
    _finite(data["with_offline"], (*LATENCY, "slo_attainment"))
    _finite(data, ("offline_tokens_per_s", "online_tokens_per_s", "ttft_p99_ratio", "tpot_p99_ratio"))
    assert data["offline_tokens_per_s"] > 0 and data["with_offline"]["failed"] == 0
    assert (tmp_path / "e2e_latency_cdf.png").stat().st_size > 0


# 3.5 minutes on the 2-core CI box (a transformers serve peer beside the service): run it with
# `pytest -m slow`; the e2e smoke above covers the same service path in CI
@pytest.mark.slow
def test_bench_peers_quick(tmp_path):
    result = CliRunner().invoke(app, ["bench", "peers", "--quick", "--repeat", "2", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "peers.json").read_text())
    systems = data["systems"]
    assert set(systems) == {"harvest", "harvest-alone", "transformers-serve"}
    for name, s in systems.items():
        _finite(s, ("ttft_p99_s", "tpot_p99_s", "online_tokens_per_s", "offline_tokens_per_s"))
        assert s["failed"] == 0, name
    assert systems["harvest"]["offline_tokens_per_s"] > 0
    assert 0 <= systems["harvest"]["offline_requests_completed"] <= data["config"]["backlog"]
    assert systems["harvest"]["empty"] == 0  # ignore_eos: every harvest request streams tokens
    # two rounds, systems interleaved: the reported figures are the median round's
    assert len(data["rounds"]) == 2
    for name, s in systems.items():
        per_round = [r[name]["ttft_p99_s"] for r in data["rounds"]]
        assert s["ttft_p99_s"] == pytest.approx(sum(per_round) / 2), name
    ttft = data["targets"]["ttft_p99_not_worse"]
    assert len(ttft["ratio_per_round"]) == 2 and ttft["met"] == (ttft["ratio_median"] <= 1.0)


# 1.5-2 minutes on the 2-core box (a service, three phases): run it with `pytest -m slow`;
# test_service's batch test covers the Batch API on the service in CI
@pytest.mark.slow
def test_bench_batch_quick(tmp_path):
    result = CliRunner().invoke(app, ["bench", "batch", "--quick", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "batch.json").read_text())
    _finite(data["online_alone"], LATENCY)
    _finite(data["with_batches"], LATENCY)
    assert data["with_batches"]["failed"] == 0
    tenants = data["tenants"]
    assert set(tenants) == {"bulk", "urgent", "fair-a", "fair-b"}
    for name, t in tenants.items():
        assert t["harvested_tokens"] > 0 and math.isfinite(t["tokens_per_s"]), name
    assert tenants["urgent"]["completed"] == tenants["urgent"]["requests"]  # its batch finished
    assert tenants["fair-a"]["share"] + tenants["fair-b"]["share"] == pytest.approx(1.0)
    assert set(data["targets"]) == {
        "urgent_window_met",
        "fair_share_within_10pct",
        "online_ttft_p99_within_1_2x",
        "online_tpot_p99_within_1_2x",
    }
    assert all(isinstance(t["met"], bool) for t in data["targets"].values())
    for plot in ("batch_latency_cdf.png", "batch_tenants.png"):
        assert (tmp_path / plot).stat().st_size > 0


def test_bench_repeat_is_for_peers_only(tmp_path):
    result = CliRunner().invoke(app, ["bench", "engine", "--repeat", "2", "--out", str(tmp_path)])
    assert result.exit_code != 0 and "--repeat" in result.output
    result = CliRunner().invoke(app, ["bench", "peers", "--repeat", "0", "--out", str(tmp_path)])
    assert result.exit_code != 0 and "--repeat" in result.output


def test_bench_queue_quick(tmp_path):
    result = CliRunner().invoke(app, ["bench", "queue", "--quick", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "queue.json").read_text())
    run = data["engine"]["runs"]["max_tokens_16"]
    _finite(
        run,
        ("engine_us_per_request", "loop_queue_us_per_request", "io_thread_us_per_request",
         "enqueue_us_per_request", "queue_fraction", "wall_overhead"),
    )  # fmt: skip
    assert run["engine_us_per_request"] > 0 and run["io_thread_us_per_request"] > 0
    assert len(run["wall_overhead_samples"]) == 3
    assert (tmp_path / "queue.png").stat().st_size > 0
