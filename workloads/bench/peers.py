"""`harvest bench peers`: harvest next to the server a user would otherwise run.

The same model and the same online trace (gamma arrivals, CV 2, streaming HTTP clients)
against `transformers serve --continuous-batching` serving the online trace alone, and
against harvest serving it alone and then while an offline backlog in Redis soaks up the
idle time, with the peer's P99 latencies as harvest's SLO. The question: are harvest's
online P99 latencies no worse, while it also finishes offline work?
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from workloads.bench.common import console, free_port, local_ray, print_table, write_result
from workloads.bench.e2e import (
    _replay_http,
    _wait_healthy,
    backlog_prompts,
    bench_config,
    generated_tokens,
    latency_samples,
    latency_summary,
    start_service,
)
from workloads.bench.plots import plot_latency_cdfs
from workloads.traces import gamma_arrivals


def _summary(results: list[dict], duration: float) -> dict:
    return {**latency_summary(results), "online_tokens_per_s": sum(r["tokens"] for r in results) / duration}


def _transformers_serve(model: Path, arrivals, port: int) -> tuple[list[dict], float]:
    cli = shutil.which("transformers") or str(Path(sys.executable).parent / "transformers")
    proc = subprocess.Popen(
        [cli, "serve", str(model), "--continuous-batching", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_healthy(f"http://127.0.0.1:{port}")
        base = f"http://127.0.0.1:{port}"
        asyncio.run(
            _replay_http(base, str(model), arrivals[:3], 1, ignore_eos=False)
        )  # warm-up: loads the model
        start = time.monotonic()
        results = asyncio.run(_replay_http(base, str(model), arrivals, 0, ignore_eos=False))
        return results, time.monotonic() - start
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _harvest(
    model: Path, arrivals, backlog: int, offline_tokens: int, tmp: Path, slo: dict[str, float]
) -> tuple[list[dict], float, list[dict], float, float]:
    """The trace alone, then next to the backlog with `slo` as harvest's online targets;
    returns (alone, alone seconds, with offline, seconds, offline tokens/s)."""
    import ray

    from harvest import service
    from harvest.client import HarvestClient
    from harvest.local_redis import private_redis

    with private_redis(tmp) as redis_url, local_ray():
        try:
            base = start_service(model, redis_url)
            asyncio.run(_replay_http(base, "bench", arrivals[:3], 1))  # warm-up, as for the peer
            start = time.monotonic()
            alone = asyncio.run(_replay_http(base, "bench", arrivals, 0))
            alone_s = time.monotonic() - start
            ray.get(service.controller_handle().set_slo.remote(slo["ttft_s"], slo["tpot_s"]))
            client = HarvestClient(redis_url)
            prompts = backlog_prompts(backlog)
            job = client.submit(
                prompts,
                model="bench",
                max_tokens=offline_tokens,
                temperature=0,
                defaults={"ignore_eos": True},
                shard_size=16,
            )
            before = generated_tokens(service)[1]
            start = time.monotonic()
            results = asyncio.run(_replay_http(base, "bench", arrivals, 0))
            duration = time.monotonic() - start
            after = generated_tokens(service)[1]
            client.cancel(job.id)
            return alone, alone_s, results, duration, (after - before) / duration
        finally:
            service.stop()


def run(quick: bool, out: Path) -> dict:
    import transformers

    from harvest.models.tiny import make_tiny

    transformers.utils.logging.disable_progress_bar()
    cfg = bench_config(quick)
    arrivals = gamma_arrivals(
        cfg["rate"],
        cfg["cv"],
        num_requests=cfg["num_online"],
        prompt_len=cfg["online_prompt"],
        output_len=cfg["online_output"],
        seed=1,
    )
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        model = make_tiny(tmp / "model", "llama", hidden=cfg["hidden"], layers=cfg["layers"], heads=4)
        with console.status("transformers serve --continuous-batching: the online trace alone..."):
            peer_results, peer_s = _transformers_serve(model, arrivals, free_port())
        peer = _summary(peer_results, peer_s)
        # harvest is told to keep what the peer gives: its P99s become harvest's online SLO
        slo = {"ttft_s": peer["ttft_p99_s"], "tpot_s": peer["tpot_p99_s"]}
        with console.status("harvest: the same trace alone, then next to an offline backlog..."):
            alone, alone_s, ours, ours_s, offline_rate = _harvest(
                model, arrivals, cfg["backlog"], cfg["offline_output"], tmp, slo
            )
    systems = {
        "transformers-serve": {**peer, "offline_tokens_per_s": 0.0},
        "harvest": {**_summary(ours, ours_s), "offline_tokens_per_s": offline_rate},
        # the same trace through harvest with no offline work: how much of any gap is the
        # serving path (HTTP -> Serve -> worker actor) rather than co-serving
        "harvest-alone": {**_summary(alone, alone_s), "offline_tokens_per_s": 0.0},
    }
    h, p = systems["harvest"], systems["transformers-serve"]
    targets = {
        "ttft_p99_not_worse": {
            "harvest": h["ttft_p99_s"],
            "peer": p["ttft_p99_s"],
            "met": h["ttft_p99_s"] <= p["ttft_p99_s"],
        },
        "tpot_p99_not_worse": {
            "harvest": h["tpot_p99_s"],
            "peer": p["tpot_p99_s"],
            "met": h["tpot_p99_s"] <= p["tpot_p99_s"],
        },
    }
    result = {"systems": systems, "targets": targets, "slo": slo, "config": {**cfg, "quick": quick}}
    print_table(
        "peers: the same online trace, same model and machine",
        ["system", "TTFT p50", "TTFT p99", "TPOT p50", "TPOT p99", "online tok/s", "offline tok/s", "failed"],
        [
            [
                name,
                s["ttft_p50_s"],
                s["ttft_p99_s"],
                s["tpot_p50_s"],
                s["tpot_p99_s"],
                s["online_tokens_per_s"],
                s["offline_tokens_per_s"],
                s["failed"],
            ]
            for name, s in systems.items()
        ],
    )
    latency = {
        name: latency_samples(res)
        for name, res in (("transformers-serve", peer_results), ("harvest-alone", alone), ("harvest", ours))
    }
    plot_latency_cdfs(latency, slo, out / "peers_latency_cdf.png")
    write_result(out, "peers", result)
    return result
