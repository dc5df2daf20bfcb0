"""`harvest bench batch`: the OpenAI Batch API on harvested capacity, tenants beside online traffic.

One local service (private Redis, local Ray, one worker behind Serve's HAProxy) with one API
key per tenant. Files and batches go through the official `openai` client; the online trace
goes through e2e's streaming HTTP client (`replay_http`, with its own key), so its latencies
compare with the e2e suite's. Three phases:

1. online alone: e2e's trace; its P99s set the SLO the workers plan with, as in e2e.
2. beside online: `bulk` creates a large batch (24h window), the trace is replayed again, and
   a few seconds in `urgent` creates a small one with the service's shortest window (5m),
   which the lease order puts first (earliest deadline class, docs/QUEUE.md). Each tenant's
   harvested tokens/s, whether `urgent` met its window, its `x_harvest` ETA against the truth.
3. fairness: `bulk` cancelled, `fair-a` and `fair-b` create equal batches (same window) at
   once; their cumulative shares of the harvested tokens are sampled for `fair_s` seconds (or
   until one batch is done), and judged at the last sample where both still had work.

Harvested tokens are the queue's own per-tenant counters (`JobStore.tenant_usage`, prompt +
completion tokens of the results written), read from Redis every half second.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from harvest.local_redis import private_redis
from harvest.queue.store import JobStore
from workloads.bench.common import console, local_ray, print_table, write_result
from workloads.bench.e2e import bench_config, start_service
from workloads.bench.plots import plot_latency_cdfs, plot_tenants
from workloads.http_replay import latency_samples, latency_summary, replay_http
from workloads.stats import LATENCY_KEYS
from workloads.traces import gamma_arrivals

MODEL = "bench"
ENDPOINT = "/v1/completions"
KEYS = {name: f"sk-bench-{name}" for name in ("online", "bulk", "urgent", "fair-a", "fair-b")}
FAIR = ("fair-a", "fair-b")
LONG_WINDOW, SHORT_WINDOW, SHORT_WINDOW_S = "24h", "5m", 300  # 5m: the service's shortest
FAIR_SHARE_TOLERANCE = 0.10  # each tenant's share within 10% of the equal share
P99_RATIO_BOUND = 1.2  # the Batch API issue's bound: online P99s beside batches within 1.2x of alone
SAMPLE_S = 0.5


def batch_config(quick: bool) -> dict:
    return {
        "online": bench_config(quick),
        # more than the trace can take (an idle box harvests ~800 of them in the quick trace)
        "bulk_requests": 4096 if quick else 16384,
        "urgent_requests": 64,  # one shard
        "batch_max_tokens": 32,
        # more than `fair_s` can take, so both have work throughout. Shards are leased whole, so
        # the shares swing by about a shard (~2,200 tokens): a few percent after 20 s idle
        "fair_requests": 2048 if quick else 8192,
        "fair_max_tokens": 16,
        "fair_s": 20.0 if quick else 90.0,
        "urgent_after_s": 3.0,  # into the trace: bulk is running, and has set a rate for the ETA
        "wait_s": 120 if quick else 600,  # the most the trace phase waits for urgent to finish
    }


def batch_file(tag: str, n: int, max_tokens: int) -> bytes:
    """`n` distinct completion lines (distinct: identical greedy prompts would be computed once)."""
    lines = [
        {
            "custom_id": f"{tag}-{i}",
            "method": "POST",
            "url": ENDPOINT,
            "body": {
                "model": MODEL,
                "prompt": f"{tag} {i}: the river ran past the mill and",
                "max_tokens": max_tokens,
                "temperature": 0,
                "ignore_eos": True,
            },
        }
        for i in range(n)
    ]
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def openai_client(base: str, tenant: str):
    import openai

    return openai.OpenAI(base_url=f"{base}/v1", api_key=KEYS[tenant], max_retries=0, timeout=120)


def upload(client, tag: str, n: int, max_tokens: int) -> str:
    return client.files.create(file=(f"{tag}.jsonl", batch_file(tag, n, max_tokens)), purpose="batch").id


def create(client, file_id: str, window: str):
    return client.batches.create(input_file_id=file_id, endpoint=ENDPOINT, completion_window=window)


def sample(store: JobStore, start: float, jobs: dict[str, str]) -> dict[str, Any]:
    """Each tenant's harvested tokens so far, its batch's (tenant -> id) completed requests and
    whether that batch is done."""
    tokens = store.tenant_usage()
    counts = {tenant: store.get_job(job_id).request_counts for tenant, job_id in jobs.items()}
    return {
        "t": time.monotonic() - start,
        "tokens": {t: tokens.get(t, {}).get("harvested", 0) for t in jobs},
        "completed": {t: c.completed for t, c in counts.items()},
        "done": {t: c.completed + c.failed >= c.total for t, c in counts.items()},
    }


def _beside_online(base: str, store: JobStore, arrivals, cfg: dict) -> tuple[dict, list[dict]]:
    """Phase 2: bulk, then the trace, then urgent a few seconds in; until both trace and urgent end."""
    bulk_client, urgent_client = openai_client(base, "bulk"), openai_client(base, "urgent")
    bulk_file = upload(bulk_client, "bulk", cfg["bulk_requests"], cfg["batch_max_tokens"])
    urgent_file = upload(urgent_client, "urgent", cfg["urgent_requests"], cfg["batch_max_tokens"])
    jobs = {"bulk": create(bulk_client, bulk_file, LONG_WINDOW).id}
    loaded: list[dict] = []
    replay = threading.Thread(
        target=lambda: asyncio.run(
            replay_http(base, MODEL, arrivals, 0, results=loaded, api_key=KEYS["online"])
        )
    )
    start = time.monotonic()
    replay.start()
    timeline, urgent, urgent_created_s, replay_s = [sample(store, start, jobs)], None, 0.0, None
    with console.status("online with two tenants' batches..."):
        while True:
            time.sleep(SAMPLE_S)
            if urgent is None and time.monotonic() - start >= cfg["urgent_after_s"]:
                urgent = create(urgent_client, urgent_file, SHORT_WINDOW)
                jobs["urgent"] = urgent.id
                urgent_created_s = time.monotonic() - start
            timeline.append(sample(store, start, jobs))
            if replay_s is None and not replay.is_alive():
                replay_s = timeline[-1]["t"]
            urgent_done = timeline[-1]["done"].get("urgent", False)
            if replay_s is not None and (urgent_done or timeline[-1]["t"] > cfg["wait_s"]):
                break
    replay.join()
    assert urgent is not None  # the trace outlasts urgent_after_s
    final = urgent_client.batches.retrieve(urgent.id)  # its output file written by this read
    job = store.get_job(urgent.id)
    at_end = next(s for s in timeline if s["t"] >= replay_s)
    bulk_tokens = at_end["tokens"]["bulk"] - timeline[0]["tokens"]["bulk"]
    urgent_s = (job.completed_at - job.created_at) if job.completed_at else None
    eta = (urgent.model_extra or {}).get("x_harvest", {}).get("eta")
    tenants = {
        "bulk": {
            "phase": "beside online",
            "requests": cfg["bulk_requests"],
            "completed": at_end["completed"]["bulk"],
            "window": LONG_WINDOW,
            "harvested_tokens": bulk_tokens,
            "seconds": replay_s,  # over the trace: bulk has work all along
            "tokens_per_s": bulk_tokens / replay_s,
        },
        "urgent": {
            "phase": "beside online",
            "requests": cfg["urgent_requests"],
            "completed": final.request_counts.completed,
            "window": SHORT_WINDOW,
            "status": final.status,
            "created_after_s": urgent_created_s,
            "harvested_tokens": timeline[-1]["tokens"]["urgent"],
            "seconds": urgent_s,  # created -> completed
            "tokens_per_s": timeline[-1]["tokens"]["urgent"] / urgent_s if urgent_s else None,
            "created_at": final.created_at,
            "completed_at": final.completed_at,
            "window_met": final.completed_at is not None
            and final.completed_at <= final.created_at + SHORT_WINDOW_S,
            "eta_s": eta - urgent.created_at if eta else None,  # x_harvest's estimate at creation
        },
    }
    phase = {"tenants": tenants, "trace_s": replay_s, "timeline": timeline, "bulk_id": jobs["bulk"]}
    return phase, loaded


def _fairness(base: str, store: JobStore, cfg: dict, bulk_id: str) -> dict:
    """Phase 3: bulk cancelled (and its leased shards back), then two equal batches at once."""
    cancelled = time.monotonic()
    openai_client(base, "bulk").batches.cancel(bulk_id)
    deadline = cancelled + 60  # a leased shard hears of the cancel at its next renewal
    while not store.get_job(bulk_id).status.is_terminal and time.monotonic() < deadline:
        time.sleep(SAMPLE_S)
    cancel_s = time.monotonic() - cancelled
    clients = {t: openai_client(base, t) for t in FAIR}
    files = {t: upload(clients[t], t, cfg["fair_requests"], cfg["fair_max_tokens"]) for t in FAIR}
    start = time.monotonic()
    with ThreadPoolExecutor(len(FAIR)) as pool:  # both arrive together: neither has a head start
        batches = dict(zip(FAIR, pool.map(lambda t: create(clients[t], files[t], LONG_WINDOW), FAIR)))
    jobs = {t: b.id for t, b in batches.items()}
    timeline = [sample(store, start, jobs)]
    with console.status("two tenants, equal batches..."):
        while not any(timeline[-1]["done"].values()) and timeline[-1]["t"] < cfg["fair_s"]:
            time.sleep(SAMPLE_S)
            timeline.append(sample(store, start, jobs))
    # judged while both had work (after that one runs alone), over the window's second half:
    # the first shards, leased whole, swing the early shares whatever the order
    contended = [s for s in timeline if not any(s["done"].values()) and sum(s["tokens"].values())]
    last = contended[-1] if contended else timeline[-1]
    settled = [s for s in contended if s["t"] >= last["t"] / 2] or [last]
    total = sum(last["tokens"].values()) or 1
    tenants = {
        t: {
            "phase": "fairness",
            "requests": cfg["fair_requests"],
            "completed": last["completed"][t],
            "window": LONG_WINDOW,
            "harvested_tokens": last["tokens"][t],
            "seconds": last["t"],
            "tokens_per_s": last["tokens"][t] / last["t"] if last["t"] else None,
            "share": last["tokens"][t] / total,
        }
        for t in FAIR
    }
    return {
        "tenants": tenants,
        "judged_from_s": settled[0]["t"],
        "judged_at_s": last["t"],
        "deviation": max(map(share_deviation, settled)),  # the worst point judged
        "final_deviation": share_deviation(last),
        "bulk_cancel_s": cancel_s,  # cancel -> its leased shards back (the next renewal)
        "timeline": timeline,
    }


def share_deviation(point: dict) -> float:
    """How far the furthest tenant's cumulative share is from an equal one, relative to it."""
    total, equal = sum(point["tokens"].values()), 1 / len(point["tokens"])
    return max(abs(n / total - equal) / equal for n in point["tokens"].values()) if total else 1.0


def _measure(model: Path, redis_url: str, files: Path, ray, cfg: dict) -> dict:
    from harvest import service

    online = cfg["online"]
    lengths = {"prompt_len": online["online_prompt"], "output_len": online["online_output"]}
    arrivals = gamma_arrivals(
        online["rate"], online["cv"], num_requests=online["num_online"], seed=1, **lengths
    )
    store = JobStore.from_url(redis_url)
    tenants_by_key = {key: name for name, key in KEYS.items()}
    try:
        base = start_service(model, redis_url, api_key=tenants_by_key, files_uri=str(files))
        key = KEYS["online"]
        asyncio.run(replay_http(base, MODEL, arrivals[:3], 1, api_key=key))  # warm-up, as in e2e
        with console.status(f"online alone: {len(arrivals)} requests over HTTP..."):
            alone = asyncio.run(replay_http(base, MODEL, arrivals, 0, api_key=key))
        base_lat = latency_summary(alone)
        slo = {"ttft_s": 1.2 * base_lat["ttft_p99_s"], "tpot_s": 2.0 * base_lat["tpot_p50_s"]}
        ray.get(service.controller_handle().set_slo.remote(slo["ttft_s"], slo["tpot_s"]))
        mixed, loaded = _beside_online(base, store, arrivals, cfg)
        fair = _fairness(base, store, cfg, mixed.pop("bulk_id"))
    finally:
        service.stop()
    with_batches = latency_summary(loaded)
    return {
        "slo": slo,
        "online_alone": base_lat,
        "with_batches": with_batches,
        "ttft_p99_ratio": with_batches["ttft_p99_s"] / base_lat["ttft_p99_s"],
        "tpot_p99_ratio": with_batches["tpot_p99_s"] / base_lat["tpot_p99_s"],
        "tenants": {**mixed.pop("tenants"), **fair.pop("tenants")},
        "beside_online": mixed,
        "fairness": fair,
        "latency": {"alone": latency_samples(alone), "harvest": latency_samples(loaded)},
    }


def targets(result: dict) -> dict[str, dict]:
    urgent = result["tenants"]["urgent"]
    found = {
        "urgent_window_met": {
            "value": urgent["seconds"],
            "bound": SHORT_WINDOW_S,
            "met": urgent["window_met"],
        },
        "fair_share_within_10pct": {
            "value": result["fairness"]["deviation"],  # max |share - 1/2| / (1/2), second half
            "bound": FAIR_SHARE_TOLERANCE,
            "met": result["fairness"]["deviation"] <= FAIR_SHARE_TOLERANCE,
        },
    }
    for metric in ("ttft", "tpot"):
        ratio = result[f"{metric}_p99_ratio"]
        found[f"online_{metric}_p99_within_1_2x"] = {
            "value": ratio,
            "bound": P99_RATIO_BOUND,
            "met": ratio <= P99_RATIO_BOUND,
        }
    return found


def run(quick: bool, out: Path) -> dict:
    import transformers

    from harvest.models.tiny import make_tiny

    transformers.utils.logging.disable_progress_bar()
    cfg = batch_config(quick)
    with (
        tempfile.TemporaryDirectory(prefix="harvest-batch-") as tmp_dir,
        private_redis(Path(tmp_dir)) as redis_url,
    ):
        tmp, online = Path(tmp_dir), cfg["online"]
        model = make_tiny(tmp / "model", "llama", hidden=online["hidden"], layers=online["layers"], heads=4)
        with local_ray() as ray:
            result = _measure(model, redis_url, tmp / "files", ray, cfg)
    result["targets"] = targets(result)
    result["config"] = {**cfg, "quick": quick}
    latency = result.pop("latency")
    print_table(
        "batch: online over HTTP, alone and beside two tenants' batches",
        ["run", "TTFT p50 ms", "TTFT p99 ms", "TPOT p50 ms", "TPOT p99 ms", "failed"],
        [
            [name, *(1000 * d[k] for k in LATENCY_KEYS), d["failed"]]
            for name, d in (("alone", result["online_alone"]), ("with batches", result["with_batches"]))
        ],
    )
    print_table(
        "batch: harvested per tenant (prompt + completion tokens)",
        ["tenant", "window", "requests", "done", "tokens", "s", "tokens/s", "share"],
        [
            [name, t["window"], t["requests"], t["completed"], t["harvested_tokens"], t["seconds"],
             t["tokens_per_s"], t.get("share", "")]
            for name, t in result["tenants"].items()
        ],
    )  # fmt: skip
    print_table(
        "batch: targets",
        ["target", "value", "bound", "met"],
        [
            [name, t["value"], t["bound"], "met" if t["met"] else "MISSED"]
            for name, t in result["targets"].items()
        ],
    )
    plot_latency_cdfs(latency, result["slo"], out / "batch_latency_cdf.png")
    plot_tenants(result, out / "batch_tenants.png")
    write_result(out, "batch", result)
    return result
