"""Replay an online trace against an OpenAI-compatible HTTP endpoint, and summarise it.

The client side of the end-to-end suites (e2e, peers) and of `harvest demo`: each arrival
is one streamed completion sent at its trace time; each result is one dict (ttft_s,
tpot_s, tokens, ok). `workloads/replay.py` is the same for an in-process engine.
"""

from __future__ import annotations

import asyncio
import json
import random
import time

from harvest.serving import freeze_heap
from workloads.stats import latency_percentiles
from workloads.traces import Arrival


async def replay_http(
    base: str,
    model: str,
    arrivals: list[Arrival],
    seed: int,
    ignore_eos: bool = True,
    results: list[dict] | None = None,
    api_key: str | None = None,
) -> list[dict]:
    """Stream each arrival's completion at its trace time; one dict per request (ttft_s,
    tpot_s, tokens, ok), appended to `results` as each finishes (a live view can watch it).
    `api_key`: sent as a bearer token, for a server that checks keys."""
    import httpx

    # this client shares its process with a Ray driver and torch: a full GC pass over that
    # heap stalls every stream in flight (its cost: docs/BENCHMARKS.md, peers)
    freeze_heap()
    rng = random.Random(seed)
    words = ["the", "miller", "river", "bread", "city", "library", "weather", "question", "answer", "review"]
    results = [] if results is None else results

    async def one(client: httpx.AsyncClient, a: Arrival, start: float) -> None:
        await asyncio.sleep(max(0.0, start + a.time_s - time.monotonic()))
        prompt = " ".join(rng.choice(words) for _ in range(a.prompt_tokens))
        body = {
            "model": model,
            "prompt": prompt,
            "max_tokens": a.output_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if ignore_eos:  # a vLLM-style extension; servers without it reject the field
            body["ignore_eos"] = True
        t0 = time.monotonic()
        first, chunks, tokens = None, 0, None
        async with client.stream("POST", "/v1/completions", json=body) as r:
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if event.get("usage"):  # servers that send text in uneven chunks still count tokens here
                    tokens = event["usage"]["completion_tokens"]
                if any(c.get("text") for c in event.get("choices", [])):
                    first = first or time.monotonic()
                    chunks += 1
        if first is None:  # an error, or a peer without ignore_eos that sampled EOS first: no latency
            results.append({"ttft_s": None, "tpot_s": None, "ok": r.status_code == 200, "tokens": 0})
            return
        tokens = tokens or chunks
        tpot = (time.monotonic() - first) / (tokens - 1) if tokens > 1 else None
        results.append({"ttft_s": first - t0, "tpot_s": tpot, "ok": r.status_code == 200, "tokens": tokens})

    limits = httpx.Limits(max_connections=512, max_keepalive_connections=64)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    async with httpx.AsyncClient(base_url=base, timeout=300, limits=limits, headers=headers) as client:
        start = time.monotonic() + 0.05
        await asyncio.gather(*(one(client, a, start) for a in arrivals))
    return results


def latency_samples(results: list[dict]) -> dict[str, list[float]]:
    """The TTFTs and TPOTs the replayed requests measured (a request with no token has none)."""
    return {
        "ttft_s": [r["ttft_s"] for r in results if r["ttft_s"] is not None],
        "tpot_s": [r["tpot_s"] for r in results if r["tpot_s"] is not None],
    }


def latency_summary(results: list[dict]) -> dict:
    """P50 and P99 of TTFT and TPOT, and how many requests failed or got no token."""
    samples = latency_samples(results)
    return {
        **latency_percentiles(samples["ttft_s"], samples["tpot_s"]),
        "failed": sum(not r["ok"] for r in results),
        "empty": sum(r["ok"] and r["ttft_s"] is None for r in results),  # 200 without a token
    }
