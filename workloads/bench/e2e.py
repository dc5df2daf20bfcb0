"""`harvest bench e2e`: co-serving end to end, through Ray Serve HTTP and the Redis queue.

One local service (private Redis, local Ray, one worker behind Serve's HAProxy), the same
online trace replayed twice by concurrent streaming HTTP clients: first alone, then with
an offline backlog (5x as many requests) queued in Redis at the start. Reports online
TTFT/TPOT both times, the offline tokens/s harvested, and compares the latency ratios
with the engine-level `coserve` suite when OUT/coserve.json exists.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from pathlib import Path

from harvest.local_redis import private_redis
from workloads.bench.common import console, free_port, local_ray, print_table, write_result
from workloads.bench.plots import plot_latency_cdfs
from workloads.http_replay import latency_samples, latency_summary, replay_http
from workloads.stats import LATENCY_KEYS
from workloads.traces import gamma_arrivals


def generated_tokens(service_mod) -> tuple[int, int]:
    workers = service_mod.status()["workers"].values()
    return (
        sum(w["totals"]["generated_online"] for w in workers),
        sum(w["totals"]["generated_offline"] for w in workers),
    )


def bench_config(quick: bool) -> dict:
    """The trace and model shared by the e2e and peers suites."""
    num_online = 30 if quick else 400  # the P99 of 400 is their 4th worst, of 150 the 2nd
    return {
        "num_online": num_online,
        "rate": 2.0 if quick else 3.0,
        "cv": 2.0,
        "online_prompt": "lognormal:48:0.5:192",
        "online_output": "lognormal:24:0.5:64",
        "offline_output": 96,
        "backlog": 5 * num_online,
        "hidden": 128 if quick else 192,
        "layers": 4 if quick else 6,
    }


def start_service(model: Path, redis_url: str, **config) -> str:
    """A service serving HTTP on a free port (Ray must be up); returns the base URL. By
    default one worker named "bench"; `config` overrides any `ServiceConfig` field."""
    from harvest import service

    port = free_port()
    config = {
        "model_name": "bench",
        "num_workers": 1,
        "engine_options": {"block_size": 16, "num_blocks": 512, "max_num_seqs": 32},
        **config,
    }
    settings = service.ServiceConfig(model=str(model), redis_url=redis_url, port=port, **config)
    with console.status("starting the service..."):
        service.start(settings)
        wait_healthy(f"http://127.0.0.1:{port}")
    return f"http://127.0.0.1:{port}"


def backlog_prompts(n: int) -> list[str]:
    return [" ".join(["the river ran past the mill"] * 30) + f" {i}" for i in range(n)]


def _measure(model: Path, redis_url: str, ray, cfg: dict) -> tuple[dict, list[dict], list[dict]]:
    """The trace alone, then next to the backlog; returns (result, alone, with offline)."""
    from harvest import service
    from harvest.client import HarvestClient

    num_online = cfg["num_online"]
    lengths = {"prompt_len": cfg["online_prompt"], "output_len": cfg["online_output"]}
    arrivals = gamma_arrivals(cfg["rate"], cfg["cv"], num_requests=num_online, seed=1, **lengths)
    try:
        base = start_service(model, redis_url)
        asyncio.run(replay_http(base, "bench", arrivals[:3], 1))  # warm-up, as in peers
        with console.status(f"online alone: {num_online} requests over HTTP..."):
            alone = asyncio.run(replay_http(base, "bench", arrivals, 0))
        base_lat = latency_summary(alone)
        slo = {"ttft_s": 1.2 * base_lat["ttft_p99_s"], "tpot_s": 2.0 * base_lat["tpot_p50_s"]}
        ray.get(service.controller_handle().set_slo.remote(slo["ttft_s"], slo["tpot_s"]))
        client = HarvestClient(redis_url)
        before = generated_tokens(service)
        job = client.submit(
            backlog_prompts(cfg["backlog"]),
            model="bench",
            max_tokens=cfg["offline_output"],
            temperature=0,
            defaults={"ignore_eos": True},
            shard_size=16,
        )
        start = time.monotonic()
        with console.status("online with an offline backlog in Redis..."):
            loaded = asyncio.run(replay_http(base, "bench", arrivals, 0))
        elapsed = time.monotonic() - start
        after = generated_tokens(service)
        completed = client.get(job.id).request_counts.completed
        client.cancel(job.id)
    finally:
        service.stop()
    co_lat = latency_summary(loaded)
    ok = [
        r["ok"]
        and r["ttft_s"] is not None
        and r["ttft_s"] <= slo["ttft_s"]
        and (r["tpot_s"] is None or r["tpot_s"] <= slo["tpot_s"])
        for r in loaded
    ]
    result = {
        "slo": slo,
        "online_rate_rps": cfg["rate"],
        "online_alone": base_lat,
        "with_offline": {**co_lat, "slo_attainment": sum(ok) / len(ok)},
        "offline_tokens_per_s": (after[1] - before[1]) / elapsed,
        "online_tokens_per_s": (after[0] - before[0]) / elapsed,
        "offline_requests_completed": completed,
        "ttft_p99_ratio": co_lat["ttft_p99_s"] / base_lat["ttft_p99_s"],
        "tpot_p99_ratio": co_lat["tpot_p99_s"] / base_lat["tpot_p99_s"],
    }
    return result, alone, loaded


def run(quick: bool, out: Path) -> dict:
    import transformers

    from harvest.models.tiny import make_tiny

    transformers.utils.logging.disable_progress_bar()
    cfg = bench_config(quick)
    with (
        tempfile.TemporaryDirectory(prefix="harvest-e2e-") as tmp_dir,
        private_redis(Path(tmp_dir)) as redis_url,
    ):
        model = make_tiny(
            Path(tmp_dir) / "model", "llama", hidden=cfg["hidden"], layers=cfg["layers"], heads=4
        )
        with local_ray() as ray:
            result, alone, loaded = _measure(model, redis_url, ray, cfg)
    result["config"] = {**cfg, "quick": quick}
    slo, base_lat, co_lat = result["slo"], result["online_alone"], result["with_offline"]
    result["vs_engine"] = _compare_with_engine(out, result)
    print_table(
        "e2e: online over HTTP, alone and next to a Redis backlog",
        ["run", "TTFT p50 ms", "TTFT p99 ms", "TPOT p50 ms", "TPOT p99 ms", "failed"],
        [
            [name, *(1000 * d[k] for k in LATENCY_KEYS), d["failed"]]
            for name, d in (("alone", base_lat), ("with offline", co_lat))
        ],
    )
    console.print(
        f"offline harvested: {result['offline_tokens_per_s']:.0f} tok/s; SLO attainment "
        f"{result['with_offline']['slo_attainment']:.2f}; P99 ratios TTFT {result['ttft_p99_ratio']:.2f}, "
        f"TPOT {result['tpot_p99_ratio']:.2f}"
    )
    latency = {"alone": latency_samples(alone), "harvest": latency_samples(loaded)}
    plot_latency_cdfs(latency, slo, out / "e2e_latency_cdf.png")
    write_result(out, "e2e", result)
    return result


def wait_healthy(base: str, timeout: float = 120) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError("the service never became healthy")


def _compare_with_engine(out: Path, e2e: dict) -> dict | None:
    """The engine-level harvest/online-only P99 ratios, and whether e2e holds them within 1.3x."""
    path = out / "coserve.json"
    if not path.exists():
        return None
    co = json.loads(path.read_text())["policies"]
    engine = {
        "ttft_p99_ratio": co["harvest"]["ttft_p99_s"] / co["online-only"]["ttft_p99_s"],
        "tpot_p99_ratio": co["harvest"]["tpot_p99_s"] / co["online-only"]["tpot_p99_s"],
    }
    return {
        **{f"engine_{k}": v for k, v in engine.items()},
        "within_1_3x": all(e2e[k] <= 1.3 * max(engine[k], 1.0) for k in engine),
    }
