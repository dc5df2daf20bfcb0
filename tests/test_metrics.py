"""The one metrics path: engine latencies -> stats snapshots -> Prometheus text -> the dashboard."""

from __future__ import annotations

import json
import re
import threading
from importlib.metadata import version
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.utils import floatToGoString
from typer.testing import CliRunner

from harvest.engine import RequestClass, RequestOutput, SamplingParams
from harvest.engine.metrics import LATENCY_BUCKETS_S, RequestLatency
from harvest.serving import EngineLoop, render_engine_metrics
from tests.helpers import make_engine, make_prompts

ROOT = Path(__file__).resolve().parents[1]
PARAMS = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
# worker -> (online requests, offline requests) it runs
WORKLOAD = {"worker-a": (3, 2), "worker-b": (2, 0)}
CONTROLLER = {
    "offline_requests_pending": 7,
    "jobs": [{"id": "batch_1", "request_counts": {"total": 10, "completed": 2, "failed": 1},
              "harvested_tokens": 36, "device_seconds": 1.5}],
    "queued_by_deadline": {"30m": 7, "1h": 0, "6h": 0, "24h": 0, "7d": 0, "later": 0, "none": 0},
    "tenants": {"alice": {"harvested": 36, "served": 80, "device_seconds": 1.5},
                "": {"harvested": 5, "served": 5, "device_seconds": 0.25}},
}  # fmt: skip


def run_requests(loop: EngineLoop, n_online: int, n_offline: int) -> list[RequestOutput]:
    """Submit both classes at once; the finished outputs, once every request ended."""
    finished: list[RequestOutput] = []
    done = threading.Event()

    def on_output(out: RequestOutput) -> None:
        if out.finished:
            finished.append(out)
            if len(finished) == n_online + n_offline:
                done.set()

    classes = [RequestClass.ONLINE] * n_online + [RequestClass.OFFLINE] * n_offline
    for prompt, cls in zip(make_prompts(loop.engine, [5, 9, 13, 17, 21][: len(classes)]), classes):
        loop.submit(prompt, PARAMS, request_class=cls, on_output=on_output)
    assert done.wait(120), f"{len(finished)} of {len(classes)} requests finished"
    return finished


@pytest.fixture(scope="module")
def fleet(tiny_model) -> dict[str, dict]:
    """Two workers' `EngineLoop.stats()` after each ran its WORKLOAD, and their outputs."""
    stats, outputs = {}, {}
    for worker, (n_online, n_offline) in WORKLOAD.items():
        loop = EngineLoop(make_engine(tiny_model, max_num_seqs=8))
        try:
            outputs[worker] = run_requests(loop, n_online, n_offline)
            stats[worker] = loop.stats()
        finally:
            loop.stop(timeout=30)
    return {"stats": stats, "outputs": outputs}


def samples(text: str, name: str, **labels: str) -> list:
    """Samples called `name` (with its suffix) whose labels include `labels`."""
    return [
        s
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == name and labels.items() <= s.labels.items()
    ]


def test_request_latency_reads_the_engine_timestamps():
    times = {"arrival_time": 10.0, "first_scheduled_time": 10.5, "first_token_time": 11.0, "finish_time": 13}
    out = RequestOutput("r", [], [1, 2, 3, 4, 5], finished=True, num_output_tokens=5, metrics=times)
    assert RequestLatency.of(out) == RequestLatency(e2e_s=3.0, queue_s=0.5, ttft_s=1.0, tpot_s=0.5)
    one_token = RequestOutput("r", [], [1], finished=True, num_output_tokens=1, metrics=times)
    assert RequestLatency.of(one_token).tpot_s is None
    aborted = RequestOutput("r", [], [], finished=True, metrics={"arrival_time": 1.0, "finish_time": 2.0})
    assert RequestLatency.of(aborted) == RequestLatency(e2e_s=1.0, queue_s=None, ttft_s=None, tpot_s=None)
    assert RequestLatency.of(RequestOutput("r", [1], [1], metrics=times)) is None  # not the last output


def test_engine_outputs_carry_ordered_timestamps(fleet):
    for out in fleet["outputs"]["worker-a"]:
        latency = RequestLatency.of(out)
        assert latency is not None and latency.tpot_s is not None and latency.tpot_s > 0
        assert 0 <= latency.queue_s <= latency.ttft_s <= latency.e2e_s


def test_histograms_count_every_finished_request_by_class(fleet):
    n_online, n_offline = WORKLOAD["worker-a"]
    text = render_engine_metrics({"worker-a": fleet["stats"]["worker-a"]})
    for name in ("ttft", "tpot", "queue", "e2e"):
        metric = f"harvest_request_{name}_seconds"
        for cls, n in (("online", n_online), ("offline", n_offline)):
            [count] = samples(text, f"{metric}_count", worker="worker-a", **{"class": cls})
            assert count.value == n, (metric, cls)
            buckets = samples(text, f"{metric}_bucket", worker="worker-a", **{"class": cls})
            assert len(buckets) == len(LATENCY_BUCKETS_S) + 1
            values = [b.value for b in buckets]
            assert values == sorted(values) and buckets[-1].labels["le"] == "+Inf" and values[-1] == n
        [online_sum] = samples(text, f"{metric}_sum", worker="worker-a", **{"class": "online"})
        assert online_sum.value > 0


def test_step_series_by_class(fleet):
    stats = fleet["stats"]["worker-a"]
    text = render_engine_metrics({"worker-a": stats})
    generated = {s.labels["class"]: s.value for s in samples(text, "harvest_engine_generated_tokens_total")}
    assert generated == {"online": 3 * PARAMS.max_tokens, "offline": 2 * PARAMS.max_tokens}
    computed = {s.labels["class"]: s.value for s in samples(text, "harvest_engine_computed_tokens_total")}
    assert computed["offline"] >= 2 * PARAMS.max_tokens  # the harvested work, prompts included
    [total] = samples(text, "harvest_engine_kv_blocks_total")
    assert total.value == stats["last_step"]["kv_blocks_total"] > 0
    kv_used = samples(text, "harvest_engine_kv_blocks_used")
    assert {s.labels["class"] for s in kv_used} == {"online", "offline"}
    assert len(samples(text, "harvest_engine_offline_token_budget")) == 1
    [finished] = samples(text, "harvest_engine_requests_finished_total", reason="length")
    assert finished.value == 5


def test_two_workers_aggregate_on_one_scrape(fleet):
    text = render_engine_metrics(fleet["stats"], CONTROLLER)
    counts = samples(text, "harvest_request_ttft_seconds_count", **{"class": "online"})
    assert {c.labels["worker"]: c.value for c in counts} == {"worker-a": 3, "worker-b": 2}
    # shared bounds: the fleet histogram is the per-`le` sum over workers (PromQL `sum by (le)`)
    fleet_buckets: dict[str, float] = {}
    for b in samples(text, "harvest_request_e2e_seconds_bucket", **{"class": "online"}):
        fleet_buckets[b.labels["le"]] = fleet_buckets.get(b.labels["le"], 0) + b.value
    assert fleet_buckets["+Inf"] == 5 and list(fleet_buckets.values()) == sorted(fleet_buckets.values())
    # offline ran on worker-a alone: worker-b still has the series, at zero
    offline = {c.labels["worker"]: c.value for c in samples(text, "harvest_request_e2e_seconds_count",
                                                              **{"class": "offline"})}  # fmt: skip
    assert offline == {"worker-a": 2, "worker-b": 0}
    assert samples(text, "harvest_offline_requests_pending")[0].value == 7
    progress = {s.labels["state"]: s.value for s in samples(text, "harvest_job_requests", batch="batch_1")}
    assert progress == {"total": 10, "completed": 2, "failed": 1}
    [job_tokens] = samples(text, "harvest_job_harvested_tokens", batch="batch_1")
    assert job_tokens.value == 36
    [job_seconds] = samples(text, "harvest_job_device_seconds", batch="batch_1")
    assert job_seconds.value == 1.5
    queued = {s.labels["due_within"]: s.value for s in samples(text, "harvest_offline_requests_queued")}
    assert queued == CONTROLLER["queued_by_deadline"]
    harvested = {s.labels.get("tenant", ""): s.value
                 for s in samples(text, "harvest_tenant_harvested_tokens_total")}  # fmt: skip
    assert harvested == {"alice": 36, "": 5}
    [served] = samples(text, "harvest_tenant_served_tokens", tenant="alice")
    assert served.value == 80
    seconds = {s.labels.get("tenant", ""): s.value
               for s in samples(text, "harvest_tenant_device_seconds_total")}  # fmt: skip
    assert seconds == {"alice": 1.5, "": 0.25}


def test_stats_from_a_worker_without_histograms_still_render(fleet):
    stats = json.loads(json.dumps(fleet["stats"]["worker-b"]))  # as it crosses Ray: plain data
    del stats["totals"]["latency"]
    text = render_engine_metrics({"old": stats})
    [count] = samples(text, "harvest_request_ttft_seconds_count", worker="old", **{"class": "online"})
    assert count.value == 0


def emitted_names(fleet) -> set[str]:
    stats = {w: {**s, "slo_target": [1.0, 0.1], "offline_enabled": True} for w, s in fleet["stats"].items()}
    text = render_engine_metrics(stats, CONTROLLER)
    return {s.name for f in text_string_to_metric_families(text) for s in f.samples}


def test_grafana_dashboard_queries_only_exported_series(fleet):
    dashboard = json.loads((ROOT / "docs/grafana/harvest.json").read_text())
    names = emitted_names(fleet)
    panels = [p for row in dashboard["panels"] for p in [row, *row.get("panels", [])]]
    queries = [(p["title"], t["expr"]) for p in panels for t in p.get("targets", [])]
    queries += [(v["name"], v["query"]["query"]) for v in dashboard["templating"]["list"]
                if v["type"] == "query"]  # fmt: skip
    assert len(queries) >= 10
    for where, expr in queries:
        used = set(re.findall(r"\bharvest_\w+", expr))
        assert used, f"{where}: {expr} names no harvest metric"
        assert used <= names, f"{where}: {sorted(used - names)} not exported"
    # an SLO is read off a histogram bucket: every target offered must be one of its bounds
    bounds = {floatToGoString(b) for b in LATENCY_BUCKETS_S}
    for v in dashboard["templating"]["list"]:
        if v["name"].endswith("_slo"):
            assert {o["value"] for o in v["options"]} <= bounds, v["name"]
    titles = " ".join(p["title"] for p in panels).lower()
    for topic in ("slo attainment", "ttft", "tpot", "harvested", "kv", "preemptions", "job progress"):
        assert topic in titles, topic


def test_every_series_is_documented(fleet):
    doc = (ROOT / "docs/METRICS.md").read_text()
    text = render_engine_metrics(fleet["stats"], CONTROLLER)
    names = {f.name + ("_total" if f.type == "counter" else "") for f in text_string_to_metric_families(text)}
    missing = {n for n in names if f"`{n}`" not in doc}
    assert not missing, f"not in docs/METRICS.md: {sorted(missing)}"


def test_version_flag_prints_the_installed_version():
    from harvest.cli import app

    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"harvest {version('harvest')}"


def test_controller_reports_tokens_per_tenant_and_batch_and_the_queue_by_deadline(
    queue_store, make_job, redis_server
):
    from controller.controller import HarvestController
    from harvest.queue import Result

    soon = make_job(4, shard_size=2, owner="alice", completion_window_s=1200)
    later = make_job(2, shard_size=2, owner="bob", completion_window_s=86400)
    make_job(2, shard_size=2)  # no window, no owner
    (lease,) = queue_store.lease("w", 30)
    assert lease.job_id == soon  # the earliest deadline first
    results = {i: Result("completed", text="x", prompt_tokens=5, completion_tokens=7, device_seconds=0.125)
               for i in range(2)}  # fmt: skip
    assert queue_store.write_results(lease, results) == ["ok", "ok"]
    assert queue_store.write_results(lease, results) == ["dup", "dup"]  # counted once
    controller = HarvestController({"redis_url": redis_server.url, "monitor_period_s": 60, "num_workers": 1})
    try:
        controller.monitor_round()
        status = controller.status()
    finally:
        controller.shutdown()
    tokens = {job["id"]: job["harvested_tokens"] for job in status["jobs"]}
    assert tokens[soon] == 24 and tokens[later] == 0
    seconds = {job["id"]: job["device_seconds"] for job in status["jobs"]}
    assert seconds[soon] == 0.25 and seconds[later] == 0  # 2 x 0.125, the duplicates not again
    # the lease charged an estimate; the results replaced it with their real 2 x 12 tokens
    assert status["tenants"]["alice"] == {"harvested": 24, "served": 24, "device_seconds": 0.25}
    assert status["tenants"].get("bob", {}).get("harvested", 0) == 0  # nothing leased yet
    queued = {"30m": 2, "1h": 0, "6h": 0, "24h": 2, "7d": 0, "later": 0, "none": 2}
    assert status["queued_by_deadline"] == queued
    text = render_engine_metrics({}, status)
    [alice] = samples(text, "harvest_tenant_harvested_tokens_total", tenant="alice")
    assert alice.value == 24
    [alice] = samples(text, "harvest_tenant_device_seconds_total", tenant="alice")
    assert alice.value == 0.25


def test_harvest_status_shows_tenants_batches_and_the_queue_by_deadline(monkeypatch):
    from rich.console import Console

    from harvest import service
    from harvest.cli import service as cli_service

    snapshot = {**CONTROLLER, "workers": {}, "jobs": [{**CONTROLLER["jobs"][0], "status": "in_progress",
                                                       "owner": "alice"}]}  # fmt: skip
    monkeypatch.setattr(service, "connect", lambda address: None)  # no service runs here: its answer
    monkeypatch.setattr(service, "status", lambda: snapshot)
    console = Console(record=True, width=200)
    monkeypatch.setattr(cli_service, "console", console)
    cli_service.show_service_status("auto", as_json=False)
    text = console.export_text()
    [job_row] = [line for line in text.splitlines() if "batch_1" in line]
    cells = [cell.strip() for cell in job_row.split("│")]
    assert cells[2] == "alice" and cells[-3:-1] == ["36", "1.5"]
    [alice] = [line.split("│") for line in text.splitlines() if "│ alice" in line and "batch_1" not in line]
    assert [cell.strip() for cell in alice[1:-1]] == ["alice", "36", "1.5", "80"]
    assert "(no owner)" in text and "offline requests queued: 7 due within 30m" in text
