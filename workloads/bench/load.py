"""Steady online load over HTTP for the service benchmarks: streaming clients that record
every request's outcome and when each token arrived."""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
from dataclasses import dataclass, field


@dataclass
class OnlineRequest:
    start: float
    end: float = 0.0
    ok: bool = False
    status: int | None = None
    tokens: int = 0
    got_tokens: bool = False  # something had streamed before it ended
    error: str | None = None
    retries: int = 0  # sent again after its connection broke before any response (CLIENT_RETRIES)


# How often a client sends a request again when its connection breaks before any response
# came back: what the openai SDK does by default (max_retries=2, for any connection error).
# HTTP/1.1 keep-alive has a race no server can close: a proxy may close an idle connection
# (HAProxy's soft stop on every Serve reload does) just as the client sends on it, and the
# request dies unseen by any engine. A client that never retries would count those.
CLIENT_RETRIES = 2


@dataclass
class OnlineLoad:
    """`clients` streaming clients, each sending completions until `stop` is set: back to
    back, or at most `rate_per_client` per second."""

    base: str
    model: str
    clients: int
    max_tokens: int
    rate_per_client: float | None = None
    requests: list[OnlineRequest] = field(default_factory=list)
    token_times: list[float] = field(default_factory=list)  # monotonic arrival of each streamed chunk
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> threading.Thread:
        thread = threading.Thread(target=lambda: asyncio.run(self._main()), name="online-load", daemon=True)
        thread.start()
        return thread

    async def _main(self) -> None:
        import httpx

        async with httpx.AsyncClient(base_url=self.base, timeout=60) as client:
            await asyncio.gather(*(self._client(client, i) for i in range(self.clients)))

    async def _client(self, client, index: int) -> None:
        import httpx

        n = 0
        while not self.stop.is_set():
            n += 1
            body = {
                "model": self.model,
                "prompt": f"client {index} asks question {n} about the mill",
                "max_tokens": self.max_tokens,
                "temperature": 0,
                "ignore_eos": True,
                "stream": True,
            }
            req = OnlineRequest(start=time.monotonic())
            self.requests.append(req)
            while True:
                try:
                    await self._send(client, body, req)
                except httpx.TransportError as exc:
                    if req.status is None and req.retries < CLIENT_RETRIES:
                        req.retries += 1
                        continue
                    req.error = f"{type(exc).__name__}: {exc}"
                except (httpx.HTTPError, json.JSONDecodeError) as exc:
                    req.error = f"{type(exc).__name__}: {exc}"
                break
            req.end = time.monotonic()
            if self.rate_per_client:
                await asyncio.sleep(max(0.0, req.start + 1 / self.rate_per_client - req.end))
            elif not req.ok:
                await asyncio.sleep(0.1)  # a client backs off a little after an error

    async def _send(self, client, body: dict, req: OnlineRequest) -> None:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            req.status = r.status_code
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    req.error = event["error"].get("message")
                elif any(c.get("text") for c in event.get("choices", [])):
                    req.tokens += 1
                    req.got_tokens = True
                    self.token_times.append(time.monotonic())
        req.ok = r.status_code == 200 and req.error is None and req.tokens > 0
        if r.status_code != 200:
            req.error = f"HTTP {r.status_code}"


def longest_gap(times: list[float], start: float, end: float) -> float:
    """The longest stretch in [start, end] with no online token delivered."""
    inside = [t for t in sorted(times) if start <= t <= end]
    edges = [start, *inside, end]
    return max(b - a for a, b in itertools.pairwise(edges))
